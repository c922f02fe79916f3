//! OpenAI tokens a request used, as the upstream reported them, read from its answer as the
//! bytes pass to the client: never held back, never changed, in fixed memory whatever the
//! answer's size.
//!
//! Where the figures stand: the top-level `usage` of a JSON answer (chat completions,
//! completions, embeddings, responses) or of a streamed chat completion's last chunk (with
//! `stream_options.include_usage`); `response.usage` of a streamed Responses call's
//! `response.completed` (or `.incomplete`, `.failed`) event; and of every `response.done` event
//! of a Realtime WebSocket session, summed.

mod decode;
mod json;
mod sse;
pub mod stream_options;
mod websocket;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};

use decode::{Decoder, Encoding};
use json::{Document, Field, Scanner, Schema};

/// The upstream's own token figures for one request. Kept apart because they are billed
/// apart: `cached` is part of `prompt`, `reasoning` part of `completion`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub reasoning: u64,
}

impl Usage {
    fn add(self, other: Self) -> Self {
        Self {
            prompt: self.prompt.saturating_add(other.prompt),
            completion: self.completion.saturating_add(other.completion),
            cached: self.cached.saturating_add(other.cached),
            reasoning: self.reasoning.saturating_add(other.reasoning),
        }
    }
}

/// What an answer showed of its usage, for its access record.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reading {
    pub usage: Option<Usage>,
    /// The model the upstream named in its answer.
    pub model: Option<Box<str>>,
    /// Why the usage is not known: `unknown` (the answer showed none); `compressed` (the body
    /// was content-encoded in a way not decoded here, and not read); `corrupt` or `oversized`
    /// (its gzip, deflate or br stream was broken, or decoded past `DECODED_MAX`).
    pub unknown: Option<&'static str>,
}

/// The usage of one HTTP answer, taken from its body's chunks as they pass.
pub struct Meter {
    reader: Reader,
    /// The last chunk passed on, read when the next one comes (or the body ends): by then the
    /// client's connection has taken it.
    held: Option<Bytes>,
    /// A content-encoded body's decoder, whose text the reader reads.
    decoder: Option<Decoder>,
    tally: Tally,
}

enum Reader {
    Json(Scanner),
    Sse(sse::Events),
    /// The rest of the body is not read, for this reason.
    Unread(&'static str),
}

/// The most decoded text read of one content-encoded body, which bounds the work a small
/// compressed answer can cost: well above any answer's (a 128k-token Responses stream is some
/// 40 MB of events).
const DECODED_MAX: u64 = 256 << 20;

/// The answers that carry usage figures: a successful POST to these paths.
const METERED_PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

impl Meter {
    /// A meter for this answer, if it is one that carries usage figures.
    pub fn for_answer(
        method: &Method,
        path: &str,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<Box<Self>> {
        if method != Method::POST || !status.is_success() || !METERED_PATHS.contains(&path) {
            return None;
        }
        let event_stream = headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let encoding = Encoding::of(headers);
        let reader = match (encoding, event_stream) {
            (Encoding::Other, _) => Reader::Unread(decode::COMPRESSED),
            (_, true) => Reader::Sse(sse::Events::default()),
            (_, false) => Reader::Json(Scanner::default()),
        };
        let decoder = match encoding {
            Encoding::Coded(coding) => Some(Decoder::new(coding, DECODED_MAX)),
            Encoding::Identity | Encoding::Other => None,
        };
        Some(Box::new(Self {
            reader,
            held: None,
            decoder,
            tally: Tally::default(),
        }))
    }

    /// A chunk of the body, on its way to the client.
    pub fn pass(&mut self, chunk: &Bytes) {
        if let Some(previous) = self.held.replace(chunk.clone()) {
            self.read(&previous);
        }
    }

    fn read(&mut self, data: &[u8]) {
        let Self {
            reader,
            decoder,
            tally,
            ..
        } = self;
        let mut scan = |text: &[u8]| match reader {
            Reader::Json(scanner) => scanner.feed(text),
            Reader::Sse(events) => events.feed(text, &mut |doc| tally.absorb(doc)),
            Reader::Unread(_) => {}
        };
        let Some(decoding) = decoder else {
            return scan(data);
        };
        if let Err(why) = decoding.feed(data, &mut scan) {
            // Given up: the decoder's memory goes now, not when the body ends.
            *reader = Reader::Unread(why);
            *decoder = None;
        }
    }

    /// The body ended (or was cut, or dropped).
    pub fn finish(&mut self) -> Reading {
        if let Some(last) = self.held.take() {
            self.read(&last);
        }
        let Self { reader, tally, .. } = self;
        match reader {
            Reader::Json(scanner) => scanner.finish(|doc| tally.absorb(doc)),
            Reader::Sse(events) => events.finish(&mut |doc| tally.absorb(doc)),
            Reader::Unread(why) => return tally.reading(Some(why)),
        }
        tally.reading(None)
    }
}

/// The usage of a Realtime WebSocket session: the upstream's frames, read as they pass.
#[derive(Default)]
pub struct Session {
    frames: websocket::Frames,
    tally: Tally,
}

impl Session {
    /// A meter for the WebSocket session opened at `path`, if it carries usage figures.
    pub fn for_path(path: &str) -> Option<Self> {
        let realtime = path
            .strip_prefix("/v1/realtime")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        realtime.then(|| Self {
            tally: Tally {
                session: true,
                ..Tally::default()
            },
            ..Self::default()
        })
    }

    /// Bytes the upstream sent, just written to the client.
    pub fn pass(&mut self, data: &[u8]) {
        let Self { frames, tally } = self;
        frames.feed(data, &mut |doc| tally.absorb(doc));
    }

    pub fn finish(&mut self) -> Reading {
        self.tally.reading(None)
    }
}

#[derive(Default)]
struct Tally {
    usage: Option<Usage>,
    model: Option<Box<str>>,
    /// A Realtime session: `response.done` figures add up; nothing else counts.
    session: bool,
}

impl Tally {
    fn absorb(&mut self, doc: Document<'_>) {
        if let Some(model) = [Field::Model, Field::ResponseModel, Field::SessionModel]
            .into_iter()
            .find_map(|field| doc.get(field).and_then(model_name))
        {
            self.model = Some(model);
        }
        let kind = doc
            .get(Field::Type)
            .and_then(|raw| serde_json::from_slice::<String>(raw).ok());
        let response_usage = doc.get(Field::ResponseUsage).and_then(figures);
        match (kind.as_deref(), response_usage) {
            (Some("response.done"), Some(usage)) if self.session => {
                self.usage = Some(self.usage.unwrap_or_default().add(usage));
            }
            (
                Some("response.completed" | "response.incomplete" | "response.failed"),
                Some(usage),
            ) if !self.session => {
                self.usage = Some(usage);
            }
            _ => {}
        }
        if !self.session
            && let Some(usage) = doc.get(Field::Usage).and_then(figures)
        {
            self.usage = Some(usage);
        }
    }

    fn reading(&mut self, unknown: Option<&'static str>) -> Reading {
        let usage = self.usage.take();
        Reading {
            unknown: usage.is_none().then_some(unknown.unwrap_or("unknown")),
            usage,
            model: self.model.take(),
        }
    }
}

/// The longest model name kept; a longer one is not a model name.
const MODEL_MAX: usize = 128;

/// A JSON string that looks like a model name (printable ASCII, no spaces, bounded), so that it
/// can go to the log as it is.
fn model_name(raw: &[u8]) -> Option<Box<str>> {
    let name: String = serde_json::from_slice(raw).ok()?;
    let plain =
        !name.is_empty() && name.len() <= MODEL_MAX && name.bytes().all(|b| b.is_ascii_graphic());
    plain.then(|| name.into_boxed_str())
}

/// A usage object's counts (its spellings: `json::Field::Prompt`). Null, or neither the prompt
/// nor the completion count: not usage.
fn figures(raw: &[u8]) -> Option<Usage> {
    let mut scanner = Scanner::new(Schema::Usage);
    scanner.feed(raw);
    scanner.finish(|doc| {
        let count = |field| -> Option<u64> {
            let text = std::str::from_utf8(doc.get(field)?).ok()?;
            text.trim().parse().ok()
        };
        let (prompt, completion) = (count(Field::Prompt), count(Field::Completion));
        (prompt.is_some() || completion.is_some()).then(|| Usage {
            prompt: prompt.unwrap_or(0),
            completion: completion.unwrap_or(0),
            cached: count(Field::Cached).unwrap_or(0),
            reasoning: count(Field::Reasoning).unwrap_or(0),
        })
    })
}

#[cfg(test)]
mod tests;
