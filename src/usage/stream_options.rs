//! `[limits] stream_usage`: a streamed chat completion request that does not say whether it
//! wants the usage chunk is made to ask for it, so that its usage is known.

use bytes::Bytes;
use http::Method;
use serde_json::Value;

/// What is added when the request has no `stream_options`.
const ADDED: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// Whether the request may be one to add `include_usage` to (its body still to be looked at).
pub fn applies(method: &Method, path: &str) -> bool {
    method == Method::POST && path == "/v1/chat/completions"
}

/// The body asking for the usage chunk, if it is a JSON object with `"stream": true` and no
/// `stream_options.include_usage`; None: it goes as it came. Without `stream_options` the member
/// is put first and the client's bytes follow unchanged; a `stream_options` object (or null)
/// without the key means writing the body out again.
pub fn with_include_usage(body: &[u8]) -> Option<Bytes> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object_mut()?;
    if object.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    match object.get_mut("stream_options") {
        None => {
            let open = body.iter().position(|&b| b == b'{')?;
            let mut out = Vec::with_capacity(body.len() + ADDED.len());
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(ADDED);
            out.extend_from_slice(&body[open + 1..]);
            Some(out.into())
        }
        Some(options @ Value::Null) => {
            *options = serde_json::json!({"include_usage": true});
            serde_json::to_vec(&value).ok().map(Bytes::from)
        }
        Some(Value::Object(options)) if !options.contains_key("include_usage") => {
            options.insert("include_usage".into(), Value::Bool(true));
            serde_json::to_vec(&value).ok().map(Bytes::from)
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(body: &str) -> Option<Value> {
        with_include_usage(body.as_bytes()).map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn only_streams_that_lack_it_are_changed() {
        let body = r#" {"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let out = with_include_usage(body.as_bytes()).unwrap();
        assert_eq!(
            out,
            format!(
                r#" {{"stream_options":{{"include_usage":true}},{}"#,
                &body[2..]
            )
        );
        let value = rewritten(r#"{"stream":true,"stream_options":{"x":1}}"#).unwrap();
        assert_eq!(
            value["stream_options"],
            serde_json::json!({"x":1,"include_usage":true})
        );
        let value = rewritten(r#"{"stream":true,"stream_options":null}"#).unwrap();
        assert_eq!(value["stream_options"]["include_usage"], true);
        for unchanged in [
            r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
            r#"{"stream":false}"#,
            r#"{"stream":"true"}"#,
            r#"{"model":"m"}"#,
            r#"[{"stream":true}]"#,
            r#"{"stream":true"#,
            "",
        ] {
            assert_eq!(rewritten(unchanged), None, "{unchanged}");
        }
    }
}
