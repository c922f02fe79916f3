//! How HTTP/1.1 bodies are delimited, and read, the same way on both sides of the proxy:
//! requests off client connections, responses off upstream connections.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode, Version, header};
use hyper::body::SizeHint;
use tokio::io::AsyncRead;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes: a response without Content-Length or Transfer-Encoding.
    Close,
}

impl Framing {
    pub fn has_body(self) -> bool {
        !matches!(self, Self::Empty | Self::Length(0))
    }
}

/// Whether a response has no body, whatever its fields say: one to a HEAD request, a 1xx, a 204
/// or a 304 (RFC 9112 §6.3).
pub fn bodiless(head_request: bool, status: StatusCode) -> bool {
    head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// Where the body ends, by its framing fields; `Empty` when there are none. Anything ambiguous
/// is refused: a proxy that reads a body's length differently from the server behind it (or the
/// client in front) lets one message hide inside another.
pub fn from_fields(map: &HeaderMap, version: Version) -> Result<Framing, &'static str> {
    if map.contains_key(header::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err("Transfer-Encoding in an HTTP/1.0 message");
        }
        if map.contains_key(header::CONTENT_LENGTH) {
            return Err("both Content-Length and Transfer-Encoding");
        }
        let mut codings = map
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii);
        let only_chunked = codings
            .next()
            .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
            && codings.next().is_none();
        return if only_chunked {
            Ok(Framing::Chunked)
        } else {
            Err("unsupported Transfer-Encoding")
        };
    }
    let mut length = None;
    for value in map.get_all(header::CONTENT_LENGTH) {
        let bytes = value.as_bytes();
        if bytes.is_empty() || bytes.len() > 19 || !bytes.iter().all(u8::is_ascii_digit) {
            return Err("invalid Content-Length");
        }
        let n: u64 = value
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or("invalid Content-Length")?;
        // Even the same value twice: nginx refuses that, and one reader of the message
        // taking a list where another takes a number is how smuggling starts.
        if length.is_some() {
            return Err("more than one Content-Length");
        }
        length = Some(n);
    }
    Ok(length.map_or(Framing::Empty, Framing::Length))
}

/// Reads a body's bytes out of a connection's buffer, as they arrive.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// Bytes of chunk extensions and trailer fields so far, held to `MAX_METADATA`.
    metadata: usize,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    UntilClose,
    Done,
}

/// What the buffer held.
pub enum Decoded {
    Data(Bytes),
    /// The body has ended; what is left in the buffer belongs to the next message.
    Done,
    /// Read more into the buffer, then decode again.
    More,
}

/// A body is read in pieces of at most this many bytes.
pub const BODY_READ: usize = 16 << 10;
/// Longest chunk-size line or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of chunk extensions and trailer fields, together, in one body: as much as a head
/// may have (server.max_header_size's default), since they are read and dropped like one.
const MAX_METADATA: usize = 64 << 10;

impl Decoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::UntilClose,
        };
        Self { state, metadata: 0 }
    }

    /// Counts `bytes` of chunk extensions or trailers against their limit.
    fn metadata(&mut self, bytes: usize) -> Result<(), &'static str> {
        self.metadata += bytes;
        if self.metadata > MAX_METADATA {
            return Err("chunk extensions and trailers over 64 KiB");
        }
        Ok(())
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Whether the end of the connection is the end of this body rather than a truncation.
    pub fn ends_at_close(&self) -> bool {
        matches!(self.state, State::UntilClose | State::Done)
    }

    /// The bytes still to come, exact when known.
    pub fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// How much room the buffer needs for the next read.
    pub fn read_size(&self) -> usize {
        match self.state {
            State::Length(left) | State::ChunkData(left) => left.min(BODY_READ as u64) as usize,
            State::UntilClose => BODY_READ,
            _ => 1024,
        }
    }

    /// The next piece of the body from the front of `buf`. Data frames are slices of the
    /// buffer, never copies.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, &'static str> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::Done),
                State::Length(_) | State::ChunkData(_) | State::UntilClose if buf.is_empty() => {
                    return Ok(Decoded::More);
                }
                State::UntilClose => return Ok(Decoded::Data(buf.split().freeze())),
                State::Length(left) | State::ChunkData(left) => {
                    let n = left.min(buf.len() as u64);
                    let data = buf.split_to(n as usize).freeze();
                    self.state = match self.state {
                        State::Length(_) if left == n => State::Done,
                        State::Length(_) => State::Length(left - n),
                        _ if left == n => State::ChunkEnd,
                        _ => State::ChunkData(left - n),
                    };
                    return Ok(Decoded::Data(data));
                }
                State::ChunkSize => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::More);
                    };
                    let extension = line.iter().position(|&b| b == b';');
                    self.metadata(extension.map_or(0, |at| line.len() - at))?;
                    self.state = match chunk_size(&line)? {
                        0 => State::Trailers,
                        n => State::ChunkData(n),
                    };
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk not followed by CRLF");
                    }
                    let _ = buf.split_to(2);
                    self.state = State::ChunkSize;
                }
                // Trailer fields are read and dropped: no hop after this one needs them.
                State::Trailers => match take_line(buf)? {
                    Some(line) if line.is_empty() => self.state = State::Done,
                    Some(line) => self.metadata(line.len() + 2)?,
                    None => return Ok(Decoded::More),
                },
            }
        }
    }
}

/// How reading a body off a connection failed.
#[derive(Debug)]
pub enum Broken {
    /// The connection ended before the body did.
    Truncated,
    Framing(&'static str),
    Io(io::Error),
}

/// Whose connection a body is read off: its errors name that side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A request body, off a client connection.
    Client,
    /// A response body, off an upstream connection.
    Upstream,
}

/// Reading a body off a connection failed: the one error of both sides' body readers.
#[derive(Debug)]
pub struct ReadError {
    pub peer: Peer,
    pub broken: Broken,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.peer, &self.broken) {
            (Peer::Client, Broken::Truncated) => {
                f.write_str("the client closed the connection mid-body")
            }
            (Peer::Upstream, Broken::Truncated) => {
                f.write_str("the upstream closed the connection mid-body")
            }
            (Peer::Client, Broken::Framing(what)) => {
                write!(f, "malformed chunked encoding: {what}")
            }
            (Peer::Upstream, Broken::Framing(what)) => {
                write!(f, "malformed response body from the upstream: {what}")
            }
            (Peer::Client, Broken::Io(error)) => write!(f, "reading the request body: {error}"),
            (Peer::Upstream, Broken::Io(error)) => {
                write!(f, "reading the response body: {error}")
            }
        }
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.broken {
            Broken::Io(error) => Some(error),
            _ => None,
        }
    }
}

/// The next piece of a body read straight off a connection: decoded from what `buf` holds,
/// with more read from `io` when that is not enough. Ok(None) at the body's end.
pub fn poll_piece<R: AsyncRead + Unpin>(
    decoder: &mut Decoder,
    buf: &mut BytesMut,
    io: &mut R,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<Bytes>, Broken>> {
    loop {
        match decoder.decode(buf) {
            Ok(Decoded::Data(data)) => return Poll::Ready(Ok(Some(data))),
            Ok(Decoded::Done) => return Poll::Ready(Ok(None)),
            Ok(Decoded::More) => {}
            Err(error) => return Poll::Ready(Err(Broken::Framing(error))),
        }
        buf.reserve(decoder.read_size());
        match ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)) {
            Ok(0) if decoder.ends_at_close() => return Poll::Ready(Ok(None)),
            Ok(0) => return Poll::Ready(Err(Broken::Truncated)),
            Ok(_) => {}
            Err(error) => return Poll::Ready(Err(Broken::Io(error))),
        }
    }
}

/// Takes one line (without its CRLF) off the front of `buf`, if a whole one is there.
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, &'static str> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let mut line = buf.split_to(end + 1).freeze();
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_CHUNK_LINE => Err("chunk line too long"),
        None => Ok(None),
    }
}

fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    // Extensions after ';' are allowed and ignored.
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    // Hex digits only: from_str_radix alone would take a sign too, which no other reader of
    // the same bytes might.
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err("bad chunk size");
    }
    let text = std::str::from_utf8(digits).map_err(|_| "bad chunk size")?;
    u64::from_str_radix(text, 16).map_err(|_| "bad chunk size")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};

    fn fields(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn only_unambiguous_framing_is_accepted() {
        let v11 = Version::HTTP_11;
        assert_eq!(from_fields(&fields(&[]), v11), Ok(Framing::Empty));
        assert_eq!(
            from_fields(&fields(&[("content-length", "42")]), v11),
            Ok(Framing::Length(42))
        );
        let chunked = fields(&[("transfer-encoding", "Chunked")]);
        assert_eq!(from_fields(&chunked, v11), Ok(Framing::Chunked));
        for bad in [
            fields(&[("content-length", "-1")]),
            fields(&[("content-length", "+5")]),
            fields(&[("content-length", "5, 5")]),
            fields(&[("content-length", "5"), ("content-length", "6")]),
            fields(&[("content-length", "7"), ("content-length", "7")]),
            fields(&[("content-length", "99999999999999999999")]),
            fields(&[("transfer-encoding", "gzip, chunked")]),
            fields(&[("transfer-encoding", "chunked, chunked")]),
            fields(&[("transfer-encoding", "chunked"), ("content-length", "3")]),
        ] {
            assert!(from_fields(&bad, v11).is_err(), "{bad:?}");
        }
        assert!(from_fields(&chunked, Version::HTTP_10).is_err());
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a").unwrap(), 26);
        assert_eq!(chunk_size(b"FF;name=value").unwrap(), 255);
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b"zz").is_err());
        assert!(chunk_size(b"+5").is_err());
        assert!(chunk_size(b"1234567890abcdef0").is_err());
    }

    /// Feeds `wire` in pieces of `piece` bytes and collects the body, and what is left after it.
    fn decode(framing: Framing, wire: &[u8], piece: usize) -> Result<(Vec<u8>, Vec<u8>), &str> {
        let mut decoder = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut pieces = wire.chunks(piece);
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::Done => {
                    pieces.for_each(|p| buf.extend_from_slice(p));
                    return Ok((body, buf.to_vec()));
                }
                Decoded::More => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Err("ran out"),
                },
            }
        }
    }

    #[test]
    fn bodies_decode_whatever_the_pieces() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for piece in [1, 3, wire.len()] {
            let (body, rest) = decode(Framing::Chunked, wire, piece).unwrap();
            assert_eq!((&body[..], &rest[..]), (&b"hello world"[..], &b"NEXT"[..]));
            let (body, rest) = decode(Framing::Length(5), b"helloNEXT", piece).unwrap();
            assert_eq!((&body[..], &rest[..]), (&b"hello"[..], &b"NEXT"[..]));
        }
        assert!(decode(Framing::Chunked, b"5\r\nhelloXX", 100).is_err());
        assert!(decode(Framing::Chunked, b"zz\r\n", 100).is_err());
        assert!(Decoder::new(Framing::Empty).is_done());
        assert!(Decoder::new(Framing::Close).ends_at_close());
        assert!(!Decoder::new(Framing::Length(3)).ends_at_close());
    }

    /// Shared with the response side's properties (src/upstream/http1.rs).
    pub(crate) mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A body cut into chunks, with extensions and trailers, as RFC 9112 §7.1 frames it.
        pub(crate) fn chunked(chunks: &[Vec<u8>], extension: &str, trailers: &[String]) -> Vec<u8> {
            let mut wire = Vec::new();
            for chunk in chunks.iter().filter(|c| !c.is_empty()) {
                wire.extend_from_slice(format!("{:X}{extension}\r\n", chunk.len()).as_bytes());
                wire.extend_from_slice(chunk);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(format!("0{extension}\r\n").as_bytes());
            for trailer in trailers {
                wire.extend_from_slice(format!("x-{trailer}: v\r\n").as_bytes());
            }
            wire.extend_from_slice(b"\r\n");
            wire
        }

        proptest! {
            /// Whatever the chunking and however the bytes arrive, the body decodes to what was
            /// framed, and the next message's bytes are left untouched.
            #[test]
            fn chunked_bodies_round_trip(
                chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8),
                extension in prop_oneof![Just(String::new()), "[a-z]{1,8}".prop_map(|e| format!(";{e}=1"))],
                trailers in prop::collection::vec("[a-z]{1,8}", 0..3),
                piece in 1usize..40,
                next in prop::collection::vec(any::<u8>(), 0..16),
            ) {
                let mut wire = chunked(&chunks, &extension, &trailers);
                wire.extend_from_slice(&next);
                let (body, rest) = decode(Framing::Chunked, &wire, piece).unwrap();
                prop_assert_eq!(body, chunks.concat());
                prop_assert_eq!(rest, next);
            }

            /// A chunked body cut short is never taken as whole.
            #[test]
            fn cut_chunked_bodies_are_incomplete(
                chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..32), 1..6),
                cut in any::<prop::sample::Index>(),
            ) {
                let wire = chunked(&chunks, "", &[]);
                let cut = cut.index(wire.len());
                prop_assert_eq!(decode(Framing::Chunked, &wire[..cut], 7), Err("ran out"));
            }

            /// A mutated chunk-size line is either refused or read as the hex digits it holds:
            /// never a sign, a prefix or anything else another reader could take differently.
            #[test]
            fn chunk_size_lines_are_hex_or_refused(line in "[-+0-9a-fA-FxX ;=\t]{0,20}") {
                let digits = line.split(';').next().unwrap().trim_matches([' ', '\t']);
                let strict = !digits.is_empty()
                    && digits.len() <= 15
                    && digits.bytes().all(|b| b.is_ascii_hexdigit());
                match chunk_size(line.as_bytes()) {
                    Ok(n) => {
                        prop_assert!(strict, "{line:?} accepted");
                        prop_assert_eq!(Some(n), u64::from_str_radix(digits, 16).ok());
                    }
                    Err(_) => prop_assert!(!strict, "{line:?} refused"),
                }
            }

            /// Content-Length is one run of digits, once; Transfer-Encoding is `chunked` alone
            /// and never with a Content-Length. Anything else is refused.
            #[test]
            fn framing_fields_are_accepted_only_unambiguous(
                lengths in prop::collection::vec(prop_oneof![
                    "[0-9]{1,5}", Just("1, 1".to_owned()), Just("+1".to_owned()), Just(" 1".to_owned()),
                    Just("".to_owned()), Just("0x10".to_owned())], 0..3),
                codings in prop::collection::vec(prop_oneof![
                    Just("chunked"), Just("Chunked"), Just("gzip"), Just("chunked, chunked"),
                    Just("identity")], 0..3),
            ) {
                let mut map = HeaderMap::new();
                for value in &lengths {
                    map.append(header::CONTENT_LENGTH, HeaderValue::from_str(value).unwrap());
                }
                for value in &codings {
                    map.append(header::TRANSFER_ENCODING, HeaderValue::from_static(value));
                }
                let expected = match (&lengths[..], &codings[..]) {
                    ([], []) => Ok(Framing::Empty),
                    ([], [coding]) if coding.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
                    ([length], []) if length.bytes().all(|b| b.is_ascii_digit()) && !length.is_empty() => {
                        Ok(Framing::Length(length.parse().unwrap()))
                    }
                    _ => Err(()),
                };
                prop_assert_eq!(from_fields(&map, Version::HTTP_11).map_err(|_| ()), expected);
            }
        }
    }
}
