//! A JSON scanner fed a document in pieces of any size, that keeps only the few values usage
//! accounting reads, each bounded: its memory is fixed whatever the size of the document. It
//! checks no syntax; a broken document yields fewer values, never an error.

/// The values kept, named by where they stand in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// Top-level `type` (SSE and Realtime events).
    Type,
    /// Top-level `model`.
    Model,
    /// Top-level `usage`.
    Usage,
    /// `response.usage` (Responses events, Realtime `response.done`).
    ResponseUsage,
    /// `response.model`.
    ResponseModel,
    /// `session.model` (Realtime `session.created`).
    SessionModel,
    /// In a usage object (`Schema::Usage`), in any of its spellings: chat and completions
    /// (`prompt_tokens`, `prompt_tokens_details`), the Responses API (`input_tokens`,
    /// `input_tokens_details`) and Realtime (`input_tokens`, `input_token_details`).
    Prompt,
    Completion,
    Cached,
    Reasoning,
}

const FIELDS: usize = 10;

/// Which values a scanner keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Schema {
    /// An answer's, or an event's: its type, model and usage object.
    #[default]
    Answer,
    /// A usage object's counts.
    Usage,
}

impl Field {
    /// The field whose value follows key `inner` in the object that is the value of `outer`
    /// (`inner` None: `outer` is a top-level key).
    fn at(schema: Schema, outer: &[u8], inner: Option<&[u8]>) -> Option<Self> {
        match (schema, outer, inner) {
            (Schema::Answer, b"type", None) => Some(Self::Type),
            (Schema::Answer, b"model", None) => Some(Self::Model),
            (Schema::Answer, b"usage", None) => Some(Self::Usage),
            (Schema::Answer, b"response", Some(b"usage")) => Some(Self::ResponseUsage),
            (Schema::Answer, b"response", Some(b"model")) => Some(Self::ResponseModel),
            (Schema::Answer, b"session", Some(b"model")) => Some(Self::SessionModel),
            (Schema::Usage, b"prompt_tokens" | b"input_tokens", None) => Some(Self::Prompt),
            (Schema::Usage, b"completion_tokens" | b"output_tokens", None) => {
                Some(Self::Completion)
            }
            (
                Schema::Usage,
                b"prompt_tokens_details" | b"input_tokens_details" | b"input_token_details",
                Some(b"cached_tokens"),
            ) => Some(Self::Cached),
            (
                Schema::Usage,
                b"completion_tokens_details" | b"output_tokens_details" | b"output_token_details",
                Some(b"reasoning_tokens"),
            ) => Some(Self::Reasoning),
            _ => None,
        }
    }
}

/// The longest key told apart; a longer one matches no field.
const KEY_MAX: usize = 32;
/// The most of one value kept (a usage object is some 300 bytes); a longer value is dropped.
pub const VALUE_MAX: usize = 4096;
/// The most kept of one document in all (a key repeated many times counts each time).
const KEPT_MAX: usize = 4 * VALUE_MAX;
/// Strings shorter than this (most keys and values of an answer) are searched a word at a
/// time, which beats memchr's setup; longer ones by memchr.
const SHORT: usize = 32;

#[derive(Default, Clone, Copy)]
struct Key {
    bytes: [u8; KEY_MAX],
    len: usize,
    overflow: bool,
}

impl Key {
    fn extend(&mut self, data: &[u8]) {
        match self.bytes.get_mut(self.len..self.len + data.len()) {
            Some(room) if !self.overflow => {
                room.copy_from_slice(data);
                self.len += data.len();
            }
            _ => self.overflow = true,
        }
    }

    fn get(&self) -> &[u8] {
        if self.overflow {
            b""
        } else {
            &self.bytes[..self.len]
        }
    }
}

struct Capture {
    field: Field,
    /// The depth of the object whose member it is: a `,` or `}` there ends the value.
    depth: usize,
    /// Where its text starts in `Scanner::kept`.
    start: usize,
}

/// The raw JSON text of the values one document held.
pub struct Document<'a> {
    kept: &'a [u8],
    spans: &'a [Option<(usize, usize)>; FIELDS],
}

impl Document<'_> {
    pub fn get(&self, field: Field) -> Option<&[u8]> {
        self.spans[field as usize].map(|(start, end)| &self.kept[start..end])
    }
}

#[derive(Default)]
pub struct Scanner {
    schema: Schema,
    depth: usize,
    /// Whether the containers open at depth 1 and 2 are objects (index 0 unused).
    object: [bool; 3],
    /// The key being valued at depth 1 and 2.
    keys: [Key; 3],
    in_string: bool,
    escaped: bool,
    /// The next string, if at depth 1 or 2, is a key.
    expect_key: bool,
    reading_key: bool,
    capture: Option<Capture>,
    /// The text of the values found, and of the one being read; its allocation is reused from
    /// one document to the next.
    kept: Vec<u8>,
    spans: [Option<(usize, usize)>; FIELDS],
    /// Where in the data being fed the value being kept has its first byte not yet copied.
    copy_from: usize,
}

impl Scanner {
    pub fn new(schema: Schema) -> Self {
        Self {
            schema,
            ..Self::default()
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        // A value being kept is copied a stretch at a time: from here to where it ends, or to
        // the end of `data`.
        self.copy_from = 0;
        let mut i = 0;
        while i < data.len() {
            if !self.in_string {
                self.structural(data, i);
                i += 1;
                continue;
            }
            if self.escaped {
                self.escaped = false;
                self.key_part(&data[i..=i]);
                i += 1;
                continue;
            }
            // Inside a string, only a quote or a backslash matters: jump to the next one.
            let Some(n) = string_stop(&data[i..]) else {
                self.key_part(&data[i..]);
                break;
            };
            self.key_part(&data[i..i + n]);
            if data[i + n] == b'\\' {
                self.escaped = true;
                self.key_part(b"\\");
            } else {
                self.in_string = false;
                self.reading_key = false;
            }
            i += n + 1;
        }
        self.keep(&data[self.copy_from.min(data.len())..]);
    }

    /// Hands the values the document held to `read`; the scanner is then ready for the next
    /// document.
    pub fn finish<R>(&mut self, read: impl FnOnce(Document<'_>) -> R) -> R {
        let result = read(Document {
            kept: &self.kept,
            spans: &self.spans,
        });
        let mut kept = std::mem::take(&mut self.kept);
        kept.clear();
        *self = Self {
            kept,
            ..Self::new(self.schema)
        };
        result
    }

    /// String contents, for the key being read.
    fn key_part(&mut self, data: &[u8]) {
        if self.reading_key {
            self.keys[self.depth.min(2)].extend(data);
        }
    }

    /// Copies a stretch of the value being kept, if there is one.
    fn keep(&mut self, data: &[u8]) {
        let Some(capture) = self.capture.as_ref() else {
            return;
        };
        let len = self.kept.len() + data.len();
        if len - capture.start > VALUE_MAX || len > KEPT_MAX {
            self.kept.truncate(capture.start);
            self.capture = None;
        } else {
            self.kept.extend_from_slice(data);
        }
    }

    fn structural(&mut self, data: &[u8], at: usize) {
        let byte = data[at];
        let ends_value = matches!(byte, b',' | b'}')
            && self.capture.as_ref().is_some_and(|c| c.depth == self.depth);
        if ends_value {
            self.keep(&data[self.copy_from..at]);
            if let Some(capture) = self.capture.take() {
                self.spans[capture.field as usize] = Some((capture.start, self.kept.len()));
            }
        }
        match byte {
            b'"' => {
                self.in_string = true;
                self.reading_key = self.expect_key && (1..=2).contains(&self.depth);
                if self.reading_key {
                    self.keys[self.depth] = Key::default();
                }
                self.expect_key = false;
            }
            b'{' | b'[' => {
                self.depth += 1;
                if let Some(object) = self.object.get_mut(self.depth) {
                    *object = byte == b'{';
                }
                self.expect_key = byte == b'{';
            }
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                self.expect_key = false;
            }
            b',' => self.expect_key = self.object.get(self.depth) == Some(&true),
            b':' => {
                self.expect_key = false;
                let field = match self.depth {
                    1 if self.object[1] => Field::at(self.schema, self.keys[1].get(), None),
                    2 if self.object[1] && self.object[2] => {
                        let inner = Some(self.keys[2].get());
                        Field::at(self.schema, self.keys[1].get(), inner)
                    }
                    _ => None,
                };
                if let Some(field) = field {
                    self.capture = Some(Capture {
                        field,
                        depth: self.depth,
                        start: self.kept.len(),
                    });
                    self.copy_from = at + 1;
                }
            }
            _ => {}
        }
    }
}

/// Where the first quote or backslash of `data` is. Most strings of an answer are short keys
/// and values: they are searched eight bytes at a time, which beats memchr's setup; past
/// `SHORT` bytes, memchr takes over.
fn string_stop(data: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // The high bit of each zero byte of `x` (and maybe of bytes above the first one: the
    // lowest bit set is always exact).
    let zeros = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut at = 0;
    while let Some(word) = data.get(at..at + 8) {
        if at >= SHORT {
            return memchr::memchr2(b'"', b'\\', &data[at..]).map(|n| n + at);
        }
        let word = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let found =
            zeros(word ^ (ONES * u64::from(b'"'))) | zeros(word ^ (ONES * u64::from(b'\\')));
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    let rest = data[at..].iter().position(|&b| b == b'"' || b == b'\\');
    rest.map(|n| n + at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each field's text, trimmed, as the scanner kept it.
    fn scan(text: &str) -> Vec<Option<String>> {
        let mut scanner = Scanner::default();
        scanner.feed(text.as_bytes());
        scanner.finish(|doc| {
            ALL.iter()
                .map(|&f| {
                    doc.get(f)
                        .map(|v| String::from_utf8_lossy(v).trim().to_owned())
                })
                .collect()
        })
    }

    const ALL: [Field; FIELDS] = [
        Field::Type,
        Field::Model,
        Field::Usage,
        Field::ResponseUsage,
        Field::ResponseModel,
        Field::SessionModel,
        Field::Prompt,
        Field::Completion,
        Field::Cached,
        Field::Reasoning,
    ];

    fn text(doc: &[Option<String>], field: Field) -> Option<&str> {
        doc[field as usize].as_deref()
    }

    #[test]
    fn string_ends_are_found_wherever_they_stand() {
        for len in 0..80 {
            for stop in [b'"', b'\\'] {
                for at in 0..len {
                    let mut data = vec![b'a'; len];
                    data[at] = stop;
                    if at + 1 < len {
                        data[len - 1] = b'"';
                    }
                    assert_eq!(string_stop(&data), Some(at), "{len} {at}");
                }
            }
            assert_eq!(string_stop(&vec![0xffu8; len]), None);
        }
    }

    #[test]
    fn top_level_and_nested_values() {
        let doc = scan(
            r#"{"id":"x","choices":[{"model":"no","usage":1}],"model" : "gpt-4o" ,
               "usage":{"prompt_tokens":5,"d":{"a":"}\",{"}},"x":{"usage":2}}"#,
        );
        assert_eq!(text(&doc, Field::Model), Some(r#""gpt-4o""#));
        assert_eq!(
            text(&doc, Field::Usage),
            Some(r#"{"prompt_tokens":5,"d":{"a":"}\",{"}}"#)
        );
        assert_eq!(text(&doc, Field::Type), None);
        let doc = scan(
            r#"{"type":"response.completed","response":{"id":"r","output":[{"usage":3}],"usage":{"input_tokens":7},"model":"m"}}"#,
        );
        assert_eq!(text(&doc, Field::Type), Some(r#""response.completed""#));
        assert_eq!(
            text(&doc, Field::ResponseUsage),
            Some(r#"{"input_tokens":7}"#)
        );
        assert_eq!(text(&doc, Field::ResponseModel), Some(r#""m""#));
        assert_eq!(text(&doc, Field::Usage), None);
    }

    #[test]
    fn long_values_and_keys_are_dropped_and_arrays_name_nothing() {
        let long = "9".repeat(VALUE_MAX + 1);
        let doc = scan(&format!(r#"{{"usage":{long},"model":"a"}}"#));
        assert_eq!(text(&doc, Field::Usage), None);
        assert_eq!(text(&doc, Field::Model), Some(r#""a""#));
        let doc = scan(r#"{"usageusageusageusageusageusageusage":1,"model":"b"}"#);
        assert_eq!(text(&doc, Field::Usage), None);
        assert!(text(&scan(r#"["model",{"model":"c"}]"#), Field::Model).is_none());
        assert!(scan("[DONE]").iter().all(Option::is_none));
        // A key repeated without end keeps a bounded amount.
        let repeated = format!("{{{}\"model\":\"last\"}}", r#""model":"x","#.repeat(10_000));
        let mut scanner = Scanner::default();
        scanner.feed(repeated.as_bytes());
        assert!(scanner.kept.len() <= KEPT_MAX);
        let model = scanner.finish(|doc| doc.get(Field::Model).map(<[u8]>::to_vec));
        assert_eq!(
            model.as_deref(),
            Some(&b"\"x\""[..]),
            "the last that fitted"
        );
    }
}
