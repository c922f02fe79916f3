//! Server-sent events read as they pass: each event's `data` lines go to the JSON scanner as
//! they come, and a blank line ends the event. Only a field name is ever held (a few bytes).

use super::json::{Document, Scanner};

/// Longer field names are not `data`.
const NAME_MAX: usize = 8;

#[derive(Default)]
enum Phase {
    /// At a line's field name.
    #[default]
    Name,
    /// Just after `data:`, where one space may stand.
    Space,
    /// In a `data` line's value.
    Data,
    /// In any other line.
    Skip,
}

#[derive(Default)]
pub struct Events {
    phase: Phase,
    name: [u8; NAME_MAX],
    name_len: usize,
    /// A line ended at a CR: a LF right after it ends no other line.
    after_cr: bool,
    /// The current event has data.
    has_data: bool,
    scanner: Scanner,
}

impl Events {
    pub fn feed(&mut self, mut data: &[u8], on_event: &mut impl FnMut(Document<'_>)) {
        while let Some((&byte, rest)) = data.split_first() {
            if std::mem::take(&mut self.after_cr) && byte == b'\n' {
                data = rest;
                continue;
            }
            match self.phase {
                Phase::Data | Phase::Skip => {
                    let end = memchr::memchr2(b'\r', b'\n', data).unwrap_or(data.len());
                    if matches!(self.phase, Phase::Data) {
                        self.scanner.feed(&data[..end]);
                    }
                    data = &data[end..];
                    if let Some(&eol) = data.first() {
                        self.end_line(eol, on_event);
                        data = &data[1..];
                    }
                }
                Phase::Space => {
                    self.phase = Phase::Data;
                    if byte == b' ' {
                        data = rest;
                    }
                }
                Phase::Name => {
                    data = rest;
                    match byte {
                        b'\r' | b'\n' => self.end_line(byte, on_event),
                        b':' => {
                            let data_field = &self.name[..self.name_len] == b"data";
                            self.phase = if data_field {
                                Phase::Space
                            } else {
                                Phase::Skip
                            };
                        }
                        _ if self.name_len < NAME_MAX => {
                            self.name[self.name_len] = byte;
                            self.name_len += 1;
                        }
                        _ => self.phase = Phase::Skip,
                    }
                }
            }
        }
    }

    /// The stream ended: an event it did not end with a blank line counts all the same.
    pub fn finish(&mut self, on_event: &mut impl FnMut(Document<'_>)) {
        if self.has_data || matches!(self.phase, Phase::Data) {
            self.scanner.finish(&mut *on_event);
        }
    }

    fn end_line(&mut self, eol: u8, on_event: &mut impl FnMut(Document<'_>)) {
        self.after_cr = eol == b'\r';
        match self.phase {
            // A blank line: the event ends.
            Phase::Name if self.name_len == 0 && self.has_data => {
                self.has_data = false;
                self.scanner.finish(&mut *on_event);
            }
            Phase::Data | Phase::Space => {
                // Data lines join with a line feed, which JSON takes as a space.
                if self.has_data {
                    self.scanner.feed(b"\n");
                }
                self.has_data = true;
            }
            _ => {}
        }
        self.phase = Phase::Name;
        self.name_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::super::json::Field;
    use super::*;

    fn events(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut sink = |doc: Document<'_>| {
            let model = doc.get(Field::Model).unwrap_or(b"-");
            out.push(String::from_utf8(model.to_vec()).unwrap());
        };
        let mut parser = Events::default();
        parser.feed(text.as_bytes(), &mut sink);
        parser.finish(&mut sink);
        out
    }

    #[test]
    fn data_lines_comments_and_line_ends() {
        assert_eq!(
            events(
                ": ping\n\ndata: {\"model\":\"a\"}\n\nevent: x\r\ndata:{\"model\":\r\ndata: \"b\"}\r\n\r\nid: 1\ndata: [DONE]\n\n"
            ),
            ["\"a\"", "\"b\"", "-"]
        );
        assert_eq!(events("data: {\"model\":\"c\"}"), ["\"c\""]);
        assert_eq!(
            events("datadata: {\"model\":\"d\"}\n\n"),
            Vec::<String>::new()
        );
    }
}
