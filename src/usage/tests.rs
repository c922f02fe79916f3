use proptest::prelude::*;

use super::*;

const CHAT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"a \"usage\": {\"prompt_tokens\": 99}"}}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":4,"audio_tokens":0}},"system_fingerprint":"fp"}"#;

const RESPONSES: &str = r#"{"id":"resp_1","object":"response","model":"o3-mini","output":[{"type":"message","content":[{"type":"output_text","text":"hi","usage":{"input_tokens":1}}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":8},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":123}}"#;

const EMBEDDINGS: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;

const CHAT_SSE: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"total_tokens\":14,\"prompt_tokens_details\":{\"cached_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0}}}\n\n\
data: [DONE]\n\n";

const RESPONSES_SSE: &str = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"model\":\"gpt-4.1\",\"usage\":null}}\n\n\
event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\n\n\
event: response.completed\r\ndata: {\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{\"id\":\"r\",\"model\":\"gpt-4.1\",\"output\":[],\"usage\":{\"input_tokens\":21,\"input_tokens_details\":{\"cached_tokens\":5},\"output_tokens\":30,\"output_tokens_details\":{\"reasoning_tokens\":7},\"total_tokens\":51}}}\r\n\r\n";

const NO_USAGE_SSE: &str = "data: {\"model\":\"gpt-4o-mini\",\"choices\":[]}\n\ndata: [DONE]\n\n";

fn usage(prompt: u64, completion: u64, cached: u64, reasoning: u64) -> Usage {
    Usage {
        prompt,
        completion,
        cached,
        reasoning,
    }
}

fn known(usage: Usage, model: &str) -> Reading {
    Reading {
        usage: Some(usage),
        model: Some(model.into()),
        unknown: None,
    }
}

fn encoded_meter(event_stream: bool, encoding: Option<&str>) -> Box<Meter> {
    let mut headers = HeaderMap::new();
    let kind = if event_stream {
        "text/event-stream; charset=utf-8"
    } else {
        "application/json"
    };
    headers.insert(header::CONTENT_TYPE, kind.parse().unwrap());
    if let Some(encoding) = encoding {
        headers.insert(header::CONTENT_ENCODING, encoding.parse().unwrap());
    }
    Meter::for_answer(
        &Method::POST,
        "/v1/chat/completions",
        StatusCode::OK,
        &headers,
    )
    .unwrap()
}

/// `body` read by a meter in the pieces that the cut points make.
fn read(body: &str, event_stream: bool, cuts: &[usize]) -> Reading {
    read_encoded(body.as_bytes(), event_stream, None, cuts)
}

/// `body`, sent with this `Content-Encoding`, read by a meter in the pieces that the cut
/// points make.
fn read_encoded(
    body: &[u8],
    event_stream: bool,
    encoding: Option<&str>,
    cuts: &[usize],
) -> Reading {
    let mut meter = encoded_meter(event_stream, encoding);
    let mut start = 0;
    for &cut in cuts.iter().chain([&body.len()]) {
        let cut = cut.clamp(start, body.len());
        meter.pass(&Bytes::copy_from_slice(&body[start..cut]));
        start = cut;
    }
    meter.finish()
}

fn cases() -> Vec<(&'static str, bool, Reading)> {
    vec![
        (CHAT, false, known(usage(19, 10, 3, 4), "gpt-4o-2024-08-06")),
        (RESPONSES, false, known(usage(36, 87, 8, 64), "o3-mini")),
        (
            EMBEDDINGS,
            false,
            known(usage(8, 0, 0, 0), "text-embedding-3-small"),
        ),
        (CHAT_SSE, true, known(usage(12, 2, 0, 0), "gpt-4o-mini")),
        (RESPONSES_SSE, true, known(usage(21, 30, 5, 7), "gpt-4.1")),
        (
            NO_USAGE_SSE,
            true,
            Reading {
                usage: None,
                model: Some("gpt-4o-mini".into()),
                unknown: Some("unknown"),
            },
        ),
    ]
}

#[test]
fn every_answer_split_at_every_byte() {
    for (body, event_stream, expected) in cases() {
        assert_eq!(read(body, event_stream, &[]), expected, "{body}");
        let every: Vec<usize> = (1..body.len()).collect();
        assert_eq!(read(body, event_stream, &every), expected, "byte by byte");
        for cut in 1..body.len() {
            assert_eq!(read(body, event_stream, &[cut]), expected, "cut at {cut}");
        }
    }
}

/// `pieces` compressed as `encoding` says (`deflate-raw`: deflate without zlib's wrapping, which
/// is also sent as `deflate`), the compressor flushed after each piece, as a server does after
/// each event of a stream.
fn compress(encoding: &str, pieces: &[&[u8]]) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::new();
    let level = flate2::Compression::default();
    let mut encoder: Box<dyn Write + '_> = match encoding {
        "gzip" => Box::new(flate2::write::GzEncoder::new(&mut out, level)),
        "deflate" => Box::new(flate2::write::ZlibEncoder::new(&mut out, level)),
        "deflate-raw" => Box::new(flate2::write::DeflateEncoder::new(&mut out, level)),
        "br" => Box::new(brotli::CompressorWriter::new(&mut out, 4096, 5, 22)),
        _ => unreachable!("{encoding}"),
    };
    for piece in pieces {
        encoder.write_all(piece).unwrap();
        encoder.flush().unwrap();
    }
    // Dropped, the encoder writes the stream's end.
    drop(encoder);
    out
}

const ENCODINGS: [&str; 4] = ["gzip", "deflate", "deflate-raw", "br"];

/// The `Content-Encoding` that `compress`'s `encoding` is sent with.
fn sent_as(encoding: &str) -> &str {
    encoding.trim_end_matches("-raw")
}

#[test]
fn every_compressed_answer_split_at_every_byte() {
    for (body, event_stream, expected) in cases() {
        for encoding in ENCODINGS {
            let whole = compress(encoding, &[body.as_bytes()]);
            // A stream flushed at each line, as its events come.
            let lines: Vec<&[u8]> = body.split_inclusive('\n').map(str::as_bytes).collect();
            let flushed = compress(encoding, &lines);
            let header = Some(sent_as(encoding));
            for bytes in [whole, flushed] {
                let every: Vec<usize> = (1..bytes.len()).collect();
                let read = |cuts: &[usize]| read_encoded(&bytes, event_stream, header, cuts);
                assert_eq!(read(&every), expected, "{encoding} byte by byte: {body}");
                for cut in 0..bytes.len() {
                    assert_eq!(read(&[cut]), expected, "{encoding} cut at {cut}: {body}");
                }
            }
        }
    }
}

#[test]
fn a_gzip_header_with_every_optional_field() {
    // FHCRC, FEXTRA, FNAME, FCOMMENT; then raw deflate and the trailer (not checked).
    let mut bytes = vec![0x1f, 0x8b, 8, 0x1e, 1, 2, 3, 4, 0, 3];
    bytes.extend([5, 0, b'a', b'b', 0, b'c', b'd']);
    bytes.extend(b"name.json\0a comment\0");
    bytes.extend([0xab, 0xcd]);
    bytes.extend(compress("deflate-raw", &[EMBEDDINGS.as_bytes()]));
    bytes.extend([0; 8]);
    let expected = known(usage(8, 0, 0, 0), "text-embedding-3-small");
    for cut in 0..bytes.len() {
        assert_eq!(read_encoded(&bytes, false, Some("gzip"), &[cut]), expected);
    }
    let every: Vec<usize> = (1..bytes.len()).collect();
    assert_eq!(
        read_encoded(&bytes, false, Some("x-gzip"), &every),
        expected
    );
}

#[test]
fn content_encodings_read_and_not_read() {
    let gzip = compress("gzip", &[CHAT.as_bytes()]);
    let plain = known(usage(19, 10, 3, 4), "gpt-4o-2024-08-06");
    for header in ["GZIP", "identity, gzip", " gzip "] {
        assert_eq!(
            read_encoded(&gzip, false, Some(header), &[]),
            plain,
            "{header}"
        );
    }
    assert_eq!(
        read_encoded(CHAT.as_bytes(), false, Some("identity"), &[]),
        plain
    );
    let unread = |reason| Reading {
        usage: None,
        model: None,
        unknown: Some(reason),
    };
    // Unknown, or stacked: not read.
    for header in ["zstd", "gzip, br", "gzip,gzip", "compress"] {
        assert_eq!(
            read_encoded(&gzip, false, Some(header), &[]),
            unread("compressed"),
            "{header}"
        );
    }
    // A broken stream: not JSON, or not the encoding it says.
    for (bytes, header) in [
        (CHAT.as_bytes(), "gzip"),
        (CHAT.as_bytes(), "br"),
        (&gzip[..], "br"),
    ] {
        assert_eq!(
            read_encoded(bytes, false, Some(header), &[]),
            unread("corrupt")
        );
    }
    let mut damaged = gzip.clone();
    damaged[20] ^= 0xff;
    let reading = read_encoded(&damaged, false, Some("gzip"), &[]);
    assert!(reading.usage.is_none(), "{reading:?}");
}

#[test]
fn decoding_stops_past_its_bound_and_keeps_what_it_read() {
    // A stream that shows its usage, then goes on past the bound: the figures stand.
    let mut stream = CHAT_SSE.to_owned();
    stream.push_str(&": padding\n".repeat(200));
    for encoding in ENCODINGS {
        let coding = match sent_as(encoding) {
            "gzip" => decode::Coding::Gzip,
            "deflate" => decode::Coding::Deflate,
            _ => decode::Coding::Brotli,
        };
        let bytes = compress(encoding, &[stream.as_bytes()]);
        let mut decoder = decode::Decoder::new(coding, CHAT_SSE.len() as u64 + 100);
        let mut events = sse::Events::default();
        let mut tally = Tally::default();
        let outcome = decoder.feed(&bytes, &mut |text| {
            events.feed(text, &mut |doc| tally.absorb(doc));
        });
        assert_eq!(outcome, Err("oversized"), "{encoding}");
        assert_eq!(
            tally.reading(None),
            known(usage(12, 2, 0, 0), "gpt-4o-mini")
        );
        let mut roomy = decode::Decoder::new(coding, stream.len() as u64);
        let mut decoded = Vec::<u8>::new();
        assert_eq!(roomy.feed(&bytes, &mut |text| decoded.extend(text)), Ok(()));
        assert_eq!(decoded, stream.as_bytes(), "{encoding}");
    }
}

proptest! {
    #[test]
    fn any_chunking_reads_the_same(case in 0..6usize, mut cuts in prop::collection::vec(0..800usize, 0..12)) {
        let (body, event_stream, expected) = cases().swap_remove(case);
        cuts.sort_unstable();
        prop_assert_eq!(read(body, event_stream, &cuts), expected);
    }
}

#[test]
fn which_answers_are_metered() {
    let json = HeaderMap::new();
    let post = Method::POST;
    for path in METERED_PATHS {
        assert!(Meter::for_answer(&post, path, StatusCode::OK, &json).is_some());
    }
    assert!(Meter::for_answer(&Method::GET, "/v1/responses", StatusCode::OK, &json).is_none());
    assert!(Meter::for_answer(&post, "/v1/files", StatusCode::OK, &json).is_none());
    let refused = StatusCode::BAD_REQUEST;
    assert!(Meter::for_answer(&post, "/v1/embeddings", refused, &json).is_none());
    let mut zstd = HeaderMap::new();
    zstd.insert(header::CONTENT_ENCODING, "zstd".parse().unwrap());
    let mut meter = Meter::for_answer(&post, "/v1/embeddings", StatusCode::OK, &zstd).unwrap();
    meter.pass(&Bytes::from_static(EMBEDDINGS.as_bytes()));
    assert_eq!(meter.finish().unknown, Some("compressed"));
    assert!(Session::for_path("/v1/realtime").is_some());
    assert!(Session::for_path("/v1/realtimex").is_none());
}

#[test]
fn a_realtime_session_sums_its_responses_split_at_every_byte() {
    use websocket::tests::frame;
    let done = |input: u64, output: u64| {
        format!(
            r#"{{"type":"response.done","event_id":"e","response":{{"id":"r","status":"completed","usage":{{"total_tokens":{},"input_tokens":{input},"output_tokens":{output},"input_token_details":{{"cached_tokens":2,"text_tokens":3,"audio_tokens":1}},"output_token_details":{{"text_tokens":1,"audio_tokens":0}}}}}}}}"#,
            input + output
        )
    };
    let mut bytes = frame(
        1,
        true,
        br#"{"type":"session.created","session":{"id":"s","model":"gpt-4o-realtime-preview"}}"#,
    );
    bytes.extend(frame(
        1,
        true,
        br#"{"type":"conversation.item.input_audio_transcription.completed","usage":{"input_tokens":50,"output_tokens":50}}"#,
    ));
    let first = done(6, 4);
    bytes.extend(frame(1, false, &first.as_bytes()[..40]));
    bytes.extend(frame(0, true, &first.as_bytes()[40..]));
    bytes.extend(frame(1, true, done(10, 20).as_bytes()));
    let expected = known(usage(16, 24, 4, 0), "gpt-4o-realtime-preview");
    for cut in 0..bytes.len() {
        let mut session = Session::for_path("/v1/realtime").unwrap();
        session.pass(&bytes[..cut]);
        session.pass(&bytes[cut..]);
        assert_eq!(session.finish(), expected, "cut at {cut}");
    }
    let mut session = Session::for_path("/v1/realtime").unwrap();
    for byte in &bytes {
        session.pass(std::slice::from_ref(byte));
    }
    assert_eq!(session.finish(), expected, "byte by byte");
}

/// How fast a meter reads, in a release build (the command and figures: bench/README.md).
#[test]
#[ignore = "a measurement, not a check"]
fn meter_speed() {
    let completion = include_str!("../../bench/completion.json");
    let mut stream = String::new();
    for i in 0..1000 {
        stream.push_str(&format!("data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i} \"}}}}],\"usage\":null}}\n\n"));
    }
    let long = CHAT.replace(
        "\"a \\\"usage\\\"",
        &format!(
            "\"{}",
            r#"Lorem ipsum dolor sit amet, \"quoted\" text.\n"#.repeat(25_000)
        ),
    );
    for (name, body, event_stream, encoding, rounds) in [
        ("624-byte chat.completion", completion, false, None, 200_000),
        (
            "624-byte chat.completion, gzip",
            completion,
            false,
            Some("gzip"),
            100_000,
        ),
        (
            "624-byte chat.completion, br",
            completion,
            false,
            Some("br"),
            100_000,
        ),
        ("1,000-event chat stream", stream.as_str(), true, None, 100),
        (
            "1,000-event chat stream, gzip",
            stream.as_str(),
            true,
            Some("gzip"),
            100,
        ),
        ("1.2 MB chat.completion", long.as_str(), false, None, 100),
        (
            "1.2 MB chat.completion, gzip",
            long.as_str(),
            false,
            Some("gzip"),
            100,
        ),
    ] {
        // USAGE_METER_CASE=624 runs that case alone (to count its instructions with callgrind).
        if std::env::var("USAGE_METER_CASE").is_ok_and(|case| !name.contains(&case)) {
            continue;
        }
        let (each, sent) = time_meter(body, event_stream, encoding, rounds);
        let rate = body.len() as f64 / each.as_secs_f64() / 1e6;
        println!("{name} ({sent} bytes sent): {each:?} per answer, {rate:.0} MB/s of text");
    }
}

/// The fastest time the meter took over `body` (sent with `encoding`), and the bytes sent.
fn time_meter(
    body: &str,
    event_stream: bool,
    encoding: Option<&str>,
    rounds: u32,
) -> (std::time::Duration, usize) {
    // A stream compressed as it is sent: flushed after each event.
    let bytes = match encoding {
        Some(encoding) => compress(
            encoding,
            &body
                .split_inclusive("\n\n")
                .map(str::as_bytes)
                .collect::<Vec<_>>(),
        ),
        None => body.as_bytes().to_vec(),
    };
    let chunks: Vec<Bytes> = bytes.chunks(16 << 10).map(Bytes::copy_from_slice).collect();
    // The fastest of 20 batches: other work on the machine only ever slows one down.
    let each = (0..20)
        .map(|_| {
            let started = std::time::Instant::now();
            for _ in 0..rounds / 20 {
                let mut meter = encoded_meter(event_stream, encoding.map(sent_as));
                for chunk in &chunks {
                    meter.pass(chunk);
                }
                assert!(std::hint::black_box(meter.finish()).model.is_some());
            }
            started.elapsed() / (rounds / 20)
        })
        .min()
        .unwrap();
    (each, bytes.len())
}

#[test]
fn usage_objects_in_every_spelling() {
    let chat = br#"{"prompt_tokens":9,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":1}}"#;
    assert_eq!(figures(chat), Some(usage(9, 4, 2, 1)));
    let responses = br#"{"input_tokens":9,"input_tokens_details":{"cached_tokens":2},"output_tokens":4,"output_tokens_details":{"reasoning_tokens":1}}"#;
    assert_eq!(figures(responses), Some(usage(9, 4, 2, 1)));
    let realtime = br#" {"total_tokens":13,"input_tokens":9,"output_tokens":4,"input_token_details":{"cached_tokens":2,"audio_tokens":5}}"#;
    assert_eq!(figures(realtime), Some(usage(9, 4, 2, 0)));
    assert_eq!(
        figures(br#"{"prompt_tokens":8,"total_tokens":8}"#),
        Some(usage(8, 0, 0, 0))
    );
    assert_eq!(figures(b"null"), None);
    assert_eq!(figures(br#"{"total_tokens":8}"#), None);
    assert_eq!(figures(br#"{"prompt_tokens":"8"}"#), None);
}
