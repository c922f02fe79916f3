//! Which model a request asks for, for tokens limited to some models; and the model list cut to
//! the ones a token may use.
//!
//! A request body is read ahead only for such a token, up to `INSPECT_LIMIT`, and then forwarded
//! byte for byte as it came. Every place a model can be named is looked at, and every `model`
//! found must be allowed: the query's `model` (Realtime), the path of `/v1/models/{model}`, a
//! JSON body's top-level `model` keys (wherever they stand: after a long `messages` array too)
//! and a multipart form's `model` fields.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::{HeaderValue, Method, header};
use http_body_util::BodyExt;
use serde::de::{IgnoredAny, MapAccess, Visitor};

use super::Grant;
use crate::body::ClientBody;
use crate::error::ProxyError;
use crate::generation::Generation;
use crate::headers;
use crate::proxy::ResponseBody;
use crate::tokens::Token;

/// The most of a request body read to find its model: 32 MiB, so that an audio file at OpenAI's
/// own 25 MB limit still fits in a multipart body. Only for tokens limited to some models.
pub const INSPECT_LIMIT: u64 = 32 << 20;
/// The most of a model list read to cut it down; OpenAI's is some tens of KB.
const MODEL_LIST_LIMIT: usize = 8 << 20;

/// Whether a request to `path` may name a model in its body. File uploads (`/v1/files`, and
/// the parts of `/v1/uploads`) name none and may be far larger than what is read ahead, so
/// their bodies go through unread.
pub fn body_may_name_a_model(path: &str) -> bool {
    !["/v1/files", "/v1/uploads"].iter().any(|prefix| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// Refuses a request that names a model `token` may not use; the models it names otherwise.
pub async fn check_models(
    generation: &Generation,
    token: &Token,
    parts: &http::request::Parts,
    body: Option<&ClientBody>,
) -> Result<Vec<String>, ProxyError> {
    let limit = generation.config.server.max_request_body.0;
    let (models, complete) = request_models(generation, parts, body).await?;
    if !complete {
        return Err(if limit <= INSPECT_LIMIT {
            ProxyError::BodyTooLarge { limit }
        } else {
            ProxyError::InspectTooLarge {
                limit: INSPECT_LIMIT,
            }
        });
    }
    match models.iter().find(|m| !token.allows(m)) {
        Some(refused) => Err(ProxyError::ModelNotAllowed(refused.to_string())),
        None => Ok(models),
    }
}

/// Every model a request names, in the order found (the query's, the path's, then the body's),
/// and whether the body was read whole: a body past `INSPECT_LIMIT` (or the request body limit)
/// is not looked at, and then the models are only those outside it.
pub async fn request_models(
    generation: &Generation,
    parts: &http::request::Parts,
    body: Option<&ClientBody>,
) -> Result<(Vec<String>, bool), ProxyError> {
    let mut models: Vec<String> = Vec::new();
    if let Some(query) = parts.uri.query() {
        models.extend(
            query
                .split('&')
                .filter_map(|pair| pair.strip_prefix("model="))
                .map(|m| percent_decode(m).into_owned()),
        );
    }
    if parts.method == Method::GET
        && let Some(model) = parts.uri.path().strip_prefix("/v1/models/")
    {
        models.push(percent_decode(model).into_owned());
    }
    let Some(body) = body else {
        return Ok((models, true));
    };
    let limit = generation.config.server.max_request_body.0;
    let idle = generation.upstream.config().idle_timeout.0;
    let (read, complete) = body
        .read_ahead(limit.min(INSPECT_LIMIT), idle)
        .await
        .map_err(|e| e.to_proxy_error())?;
    if complete {
        let found = body_models(parts.headers.get(header::CONTENT_TYPE), &read)?;
        models.extend(found.into_iter().map(Cow::into_owned));
    }
    Ok((models, complete))
}

fn body_models<'a>(
    content_type: Option<&HeaderValue>,
    body: &'a [u8],
) -> Result<Vec<Cow<'a, str>>, ProxyError> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    let content_type = content_type.and_then(|v| v.to_str().ok()).unwrap_or("");
    let (mime, params) = content_type.split_once(';').unwrap_or((content_type, ""));
    if mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        let boundary = params
            .split(';')
            .filter_map(|p| p.trim().split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("boundary"))
            .map(|(_, value)| value.trim().trim_matches('"'))
            .ok_or(ProxyError::Malformed("a multipart body without a boundary"))?;
        return multipart_models(body, boundary)
            .ok_or(ProxyError::Malformed("a multipart body that does not end"));
    }
    json_models(body).map_err(|_| {
        ProxyError::Malformed("a token limited to some models sends JSON or multipart bodies")
    })
}

/// Every top-level `model` of a JSON body, other values skipped without being built; a body
/// that is not an object names none.
fn json_models(body: &[u8]) -> Result<Vec<Cow<'_, str>>, serde_json::Error> {
    struct Models;
    impl<'de> Visitor<'de> for Models {
        type Value = Vec<Cow<'de, str>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut models = Vec::new();
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if key == "model" {
                    // Not a string: shown as JSON, and allowed by no rule.
                    let value: serde_json::Value = map.next_value()?;
                    models.push(match value {
                        serde_json::Value::String(s) => Cow::Owned(s),
                        other => Cow::Owned(other.to_string()),
                    });
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(models)
        }
    }
    if body.trim_ascii_start().first() != Some(&b'{') {
        // Valid JSON all the same, or the upstream could read what we did not.
        serde_json::from_slice::<IgnoredAny>(body)?;
        return Ok(Vec::new());
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let models = serde::Deserializer::deserialize_map(&mut deserializer, Models)?;
    deserializer.end()?;
    Ok(models)
}

/// The contents of every form field named `model`; None if the body does not end with its
/// closing boundary.
fn multipart_models<'a>(body: &'a [u8], boundary: &str) -> Option<Vec<Cow<'a, str>>> {
    let delimiter = format!("--{boundary}");
    let between = format!("\r\n--{boundary}");
    // The preamble ends at the first delimiter, at the start or after a line break.
    let mut rest = if body.starts_with(delimiter.as_bytes()) {
        &body[delimiter.len()..]
    } else {
        let at = find(body, between.as_bytes())?;
        &body[at + between.len()..]
    };
    let mut models = Vec::new();
    while !rest.starts_with(b"--") {
        let line_end = find(rest, b"\r\n")?;
        rest = &rest[line_end + 2..];
        let end = find(rest, between.as_bytes())?;
        let part = &rest[..end];
        let (head, content) = match find(part, b"\r\n\r\n") {
            Some(split) => (&part[..split], &part[split + 4..]),
            None => (part, &[][..]),
        };
        if field_name(head).is_some_and(|name| name == "model") {
            models.push(String::from_utf8_lossy(content));
        }
        rest = &rest[end + between.len()..];
    }
    Some(models)
}

/// The `name` of a part's `Content-Disposition: form-data; name="…"`.
fn field_name(head: &[u8]) -> Option<String> {
    let head = String::from_utf8_lossy(head);
    let disposition = head.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-disposition")
            .then_some(value)
    })?;
    disposition
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(key, _)| key.trim().eq_ignore_ascii_case("name"))
        .map(|(_, value)| value.trim().trim_matches('"').to_owned())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `%XX` escapes and `+` in a query value or path segment, decoded as the upstream would.
fn percent_decode(text: &str) -> Cow<'_, str> {
    if !text.contains(['%', '+']) {
        return Cow::Borrowed(text);
    }
    // `+` is a space; an escaped `%2B` stays a `+`, so the spaces go in before the escapes.
    let spaced: Vec<u8> = text
        .bytes()
        .map(|b| if b == b'+' { b' ' } else { b })
        .collect();
    let out = headers::percent_decoded(&spaced);
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The upstream's model list with only the entries whose `id` the token allows. Any other
/// answer (an error, say) goes to the client as it came.
pub async fn filter_model_list(
    grant: &Grant,
    mut parts: http::response::Parts,
    body: ResponseBody,
) -> Result<http::Response<ResponseBody>, ProxyError> {
    let Some(token) = grant else {
        return Ok(http::Response::from_parts(parts, body));
    };
    if parts.status != http::StatusCode::OK {
        return Ok(http::Response::from_parts(parts, body));
    }
    let bytes = http_body_util::Limited::new(body, MODEL_LIST_LIMIT)
        .collect()
        .await
        .map_err(|e| ProxyError::UpstreamProtocol(format!("the model list: {e}")))?
        .to_bytes();
    let mut list: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ProxyError::UpstreamProtocol(format!("the model list is not JSON: {e}")))?;
    if let Some(data) = list.get_mut("data").and_then(|d| d.as_array_mut()) {
        data.retain(|model| model["id"].as_str().is_some_and(|id| token.allows(id)));
    }
    let bytes = Bytes::from(list.to_string());
    parts.headers.remove(header::CONTENT_ENCODING);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok(http::Response::from_parts(
        parts,
        ResponseBody::whole(bytes),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_models_after_a_long_array() {
        let mut body = String::from("{\"messages\":[");
        for i in 0..20_000 {
            body.push_str(&format!("{{\"role\":\"user\",\"content\":\"model {i}\"}},"));
        }
        body.push_str("{}],\"model\":\"gpt-4o\",\"nested\":{\"model\":\"x\"}}");
        assert_eq!(json_models(body.as_bytes()).unwrap(), ["gpt-4o"]);
        assert_eq!(
            json_models(br#"{"model":"a","model":"b"}"#).unwrap(),
            ["a", "b"]
        );
        assert_eq!(json_models(br#"{"model":4}"#).unwrap(), ["4"]);
        assert_eq!(json_models(br#"{"mod\u0065l":"c"}"#).unwrap(), ["c"]);
        assert!(json_models(b"[1,2]").unwrap().is_empty());
        assert!(json_models(br#"{"model":"a"} trailing"#).is_err());
        assert!(json_models(b"model=gpt-4o").is_err());
    }

    #[test]
    fn multipart_model_fields() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nname=\"model\"\r\n--XyZ\r\ncontent-disposition: form-data; name=model\r\n\r\nwhisper-1\r\n--XyZ--\r\n";
        assert_eq!(multipart_models(body, "XyZ").unwrap(), ["whisper-1"]);
        assert!(multipart_models(&body[..60], "XyZ").is_none());
        let models = body_models(
            Some(&HeaderValue::from_static(
                "multipart/form-data; boundary=\"XyZ\"",
            )),
            body,
        )
        .unwrap();
        assert_eq!(models, ["whisper-1"]);
    }

    #[test]
    fn escapes_are_decoded() {
        assert_eq!(percent_decode("gpt-4o"), "gpt-4o");
        assert_eq!(percent_decode("gpt%2D4o+x"), "gpt-4o x");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
