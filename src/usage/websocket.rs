//! WebSocket frames (RFC 6455 §5) read as they pass from the upstream to the client: the payload
//! of each text message, fragmented or not, goes to the JSON scanner as it comes. Only a frame
//! header (14 bytes at most) is ever held. Binary messages, control frames and compressed
//! messages (permessage-deflate sets RSV1) are skipped.

use super::json::{Document, Scanner};

const HEADER_MAX: usize = 14;

#[derive(Default)]
pub struct Frames {
    header: [u8; HEADER_MAX],
    header_len: usize,
    /// Payload bytes left in the current frame; None: reading a header.
    payload: Option<u64>,
    /// The current frame's payload goes to the scanner.
    scanning: bool,
    /// Masking key and the offset into it (a server's frames are unmasked, but a masked one
    /// is read all the same).
    mask: Option<[u8; 4]>,
    mask_at: usize,
    /// The current frame ends its message.
    fin: bool,
    /// A text message is under way and its fragments are being read.
    in_text: bool,
    scanner: Scanner,
}

impl Frames {
    pub fn feed(&mut self, mut data: &[u8], on_message: &mut impl FnMut(Document<'_>)) {
        while !data.is_empty() {
            let Some(left) = self.payload else {
                let n = (HEADER_MAX - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
                self.header_len += n;
                let used = self.parse_header();
                // What was copied past the header belongs to the payload.
                data = &data[n - (self.header_len - used).min(n)..];
                if self.payload.is_some() {
                    self.header_len = 0;
                }
                if self.payload == Some(0) {
                    self.end_frame(on_message);
                }
                continue;
            };
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
            if self.scanning {
                self.scan(&data[..n]);
            }
            data = &data[n..];
            self.payload = Some(left - n as u64);
            if left == n as u64 {
                self.end_frame(on_message);
            }
        }
    }

    /// Reads the header once whole: sets up the payload and returns the header's length;
    /// returns the bytes held (so none are consumed) while it is not whole yet.
    fn parse_header(&mut self) -> usize {
        let held = self.header_len;
        if held < 2 {
            return held;
        }
        let (first, second) = (self.header[0], self.header[1]);
        let extended = match second & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let masked = second & 0x80 != 0;
        let length = 2 + extended + if masked { 4 } else { 0 };
        if held < length {
            return held;
        }
        let payload = match extended {
            0 => u64::from(second & 0x7f),
            n => self.header[2..2 + n]
                .iter()
                .fold(0u64, |acc, &b| acc << 8 | u64::from(b)),
        };
        self.mask = masked.then(|| {
            let key = &self.header[2 + extended..length];
            [key[0], key[1], key[2], key[3]]
        });
        self.mask_at = 0;
        self.fin = first & 0x80 != 0;
        let compressed = first & 0x40 != 0;
        match first & 0x0f {
            // Text: a new message.
            1 => self.in_text = !compressed,
            // Binary: a new message, not read.
            2 => self.in_text = false,
            // Continuation: the message's kind holds; control frames interleave and hold it too.
            _ => {}
        }
        let control = first & 0x08 != 0;
        self.scanning = self.in_text && !control;
        self.payload = Some(payload);
        length
    }

    fn scan(&mut self, data: &[u8]) {
        let Some(mask) = self.mask else {
            self.scanner.feed(data);
            return;
        };
        let mut chunk = [0u8; 256];
        for piece in data.chunks(chunk.len()) {
            for (out, &b) in chunk.iter_mut().zip(piece) {
                *out = b ^ mask[self.mask_at % 4];
                self.mask_at += 1;
            }
            self.scanner.feed(&chunk[..piece.len()]);
        }
    }

    fn end_frame(&mut self, on_message: &mut impl FnMut(Document<'_>)) {
        self.payload = None;
        if self.scanning && self.fin {
            self.in_text = false;
            self.scanner.finish(&mut *on_message);
        }
        self.scanning = false;
    }
}

#[cfg(test)]
pub mod tests {
    use super::super::json::Field;
    use super::*;

    /// A server's frame: unmasked, `fin` set or not.
    pub fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload.len() {
            n @ 0..126 => out.push(n as u8),
            n @ 126..65536 => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    fn types(bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut frames = Frames::default();
        frames.feed(bytes, &mut |doc: Document<'_>| {
            let kind = doc.get(Field::Type).unwrap_or(b"-");
            out.push(String::from_utf8(kind.to_vec()).unwrap());
        });
        out
    }

    #[test]
    fn fragmented_text_with_control_frames_between() {
        let big = format!(r#"{{"type":"big","pad":"{}"}}"#, "x".repeat(70_000));
        let mut bytes = frame(1, false, br#"{"type":"#);
        bytes.extend(frame(9, true, b"ping"));
        bytes.extend(frame(0, true, br#""a"}"#));
        bytes.extend(frame(2, true, br#"{"type":"binary"}"#));
        bytes.extend(frame(1, true, big.as_bytes()));
        bytes.extend(frame(1, true, br#"{"type":"mid"}"#));
        let mut compressed = frame(1, true, br#"{"type":"deflated"}"#);
        compressed[0] |= 0x40;
        bytes.extend(compressed);
        bytes.extend(frame(1, true, br#"{"type":"last"}"#));
        assert_eq!(types(&bytes), ["\"a\"", "\"big\"", "\"mid\"", "\"last\""]);
    }

    #[test]
    fn masked_frames_are_unmasked() {
        let payload = br#"{"type":"masked"}"#;
        let key = [0x12, 0x34, 0x56, 0x78];
        let mut bytes = vec![0x81, 0x80 | payload.len() as u8];
        bytes.extend_from_slice(&key);
        bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        assert_eq!(types(&bytes), ["\"masked\""]);
    }
}
