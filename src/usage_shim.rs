//! TEMPORARY, until the usage branch (issue 16's other half) lands and fills
//! `AccessRecord.usage` as the bytes pass: reads the `usage` object of a non-streamed JSON
//! answer by buffering it whole, so that token limits can be charged and tested meanwhile. The
//! lead removes this module, its `mod` line and its one call in proxy.rs at merge.

use http::{Response, header};
use http_body_util::BodyExt;

use crate::body::ResponseBody;
use crate::usage::Usage;

/// The answer with its body read whole, and the usage and model it reports, if it is JSON.
pub async fn read(
    path: &str,
    response: Response<ResponseBody>,
) -> (Response<ResponseBody>, Option<Usage>, Option<String>) {
    // Only the answers that report usage, and are small: never a file's contents.
    let reports = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
    ];
    let json = reports.contains(&path)
        && response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !json {
        return (response, None, None);
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = body.collect().await.map(|b| b.to_bytes()) else {
        let empty = ResponseBody::whole(Default::default());
        return (Response::from_parts(parts, empty), None, None);
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let figure = |name: &str| value["usage"][name].as_u64();
    let usage = figure("prompt_tokens").map(|prompt| Usage {
        prompt,
        completion: figure("completion_tokens").unwrap_or(0),
        cached: 0,
        reasoning: 0,
    });
    let model = value["model"].as_str().map(str::to_owned);
    (
        Response::from_parts(parts, ResponseBody::whole(bytes)),
        usage,
        model,
    )
}
