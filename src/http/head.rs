//! HTTP/1.1 heads, both kinds: one parser for request and response heads (httparse underneath),
//! and the writer of head fields.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version, header};

use super::framing::{self, Framing};
use crate::error::ProxyError;
use crate::headers;

/// At most this many header fields in a head (hyper's limit too).
pub const MAX_HEADERS: usize = 100;

/// Where each field of a parsed head lies in its buffer. The fields are taken once the head has
/// been split off the buffer and frozen, so that their values are slices of it, not copies; and
/// the head is parsed once, where it lies, rather than first searched for its end.
pub struct Spans {
    at: [[u32; 4]; MAX_HEADERS],
    len: usize,
}

/// Which of the fields that shape a hop a head has, noted in passing: most have none but
/// Content-Length, and looking each one up afterwards would hash every name again.
#[derive(Debug, Default, Clone, Copy)]
pub struct Noted {
    /// Content-Length or Transfer-Encoding.
    pub framed: bool,
    pub connection: bool,
    pub expect: bool,
    pub upgrade: bool,
}

impl Spans {
    /// `fields` as httparse found them in `buf`.
    pub fn new(buf: &[u8], fields: &[httparse::Header<'_>]) -> Result<Self, &'static str> {
        let mut at = [[0; 4]; MAX_HEADERS];
        for (slot, field) in at.iter_mut().zip(fields) {
            let name = span(buf, field.name.as_bytes())?;
            let value = span(buf, field.value)?;
            *slot = [name.0, name.1, value.0, value.1];
        }
        Ok(Self {
            at,
            len: fields.len(),
        })
    }

    /// The fields, taken from `head`: the bytes `new` saw, frozen.
    pub fn header_map(&self, head: &Bytes) -> Result<(HeaderMap, Noted), &'static str> {
        let mut map = HeaderMap::with_capacity(self.len);
        let mut noted = Noted::default();
        for &[name_from, name_to, value_from, value_to] in &self.at[..self.len] {
            let name = HeaderName::from_bytes(&head[name_from as usize..name_to as usize])
                .map_err(|_| "invalid header name")?;
            let value =
                HeaderValue::from_maybe_shared(head.slice(value_from as usize..value_to as usize))
                    .map_err(|_| "invalid header value")?;
            noted.framed |= name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING;
            noted.connection |= name == header::CONNECTION;
            noted.expect |= name == header::EXPECT;
            noted.upgrade |= name == header::UPGRADE;
            map.append(name, value);
        }
        Ok((map, noted))
    }
}

/// Where `part`, a slice of `buf`, lies in it.
pub fn span(buf: &[u8], part: &[u8]) -> Result<(u32, u32), &'static str> {
    let from = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    let to = from + part.len();
    if to > buf.len() {
        return Err("a field outside its head");
    }
    let from = u32::try_from(from).map_err(|_| "head too large")?;
    let to = u32::try_from(to).map_err(|_| "head too large")?;
    Ok((from, to))
}

/// Appends one header field line to a head being written.
pub fn write_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Room for httparse to note a head's fields in.
type Fields<'b> = [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS];

fn no_fields<'b>() -> Fields<'b> {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

fn version(minor: Option<u8>) -> Version {
    match minor {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    }
}

/// Splits a whole head of `length` bytes off the front of `buf`, frozen: its fields are taken
/// from it as slices (see `Spans`).
fn split_head(buf: &mut BytesMut, length: usize) -> Bytes {
    buf.split_to(length).freeze()
}

/// A request head, read.
pub struct RequestHead {
    pub parts: http::request::Parts,
    pub framing: Framing,
    pub reply: Reply,
    pub expect_continue: bool,
    /// A WebSocket upgrade, which the connection can be handed over for.
    pub upgrade: bool,
}

/// What writing the response needs to know of its request.
pub struct Reply {
    pub version: Version,
    pub head_method: bool,
    pub keep_alive: bool,
}

impl Reply {
    /// For the answer to a request refused before it was read whole: HTTP/1.1, then close.
    pub fn refused() -> Self {
        Self {
            version: Version::HTTP_11,
            head_method: false,
            keep_alive: false,
        }
    }
}

/// Parses a complete request head off the front of `buf`; None while it is incomplete.
pub fn parse_request(buf: &mut BytesMut) -> Result<Option<RequestHead>, ProxyError> {
    let malformed = ProxyError::Malformed;
    let mut fields = no_fields();
    let mut request = httparse::Request::new(&mut []);
    // An incomplete head is parsed too, so that what can never become a request, such as a TLS
    // handshake sent to a cleartext port, is refused without waiting for the rest.
    let length = match request.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(malformed("more than 100 header fields"));
        }
        Err(httparse::Error::Version) => return Err(malformed("not an HTTP/1.x request")),
        Err(_) => return Err(malformed("the request head does not parse as HTTP/1.1")),
    };
    let method = request.method.unwrap_or_default();
    // Upper-case letters, '_' and '-', as nginx takes: `get` is not GET to every server.
    if !method
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b == b'_' || b == b'-')
    {
        return Err(malformed("invalid method"));
    }
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| malformed("invalid method"))?;
    let version = version(request.version);
    let path = span(buf, request.path.unwrap_or_default().as_bytes()).map_err(malformed)?;
    let spans = Spans::new(buf, request.headers).map_err(malformed)?;
    let head = split_head(buf, length);
    let uri = Uri::from_maybe_shared(head.slice(path.0 as usize..path.1 as usize))
        .map_err(|_| malformed("invalid request target"))?;
    let (map, noted) = spans.header_map(&head).map_err(malformed)?;
    headers::check_host(&map, version).map_err(malformed)?;
    let framing = if noted.framed {
        framing::from_fields(&map, version).map_err(malformed)?
    } else {
        Framing::Empty
    };
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = map;
    Ok(Some(request_head(parts, framing, noted)))
}

/// What a request's fields say of its exchange: keep-alive, `100-continue`, an upgrade.
fn request_head(parts: http::request::Parts, framing: Framing, noted: Noted) -> RequestHead {
    let (version, map) = (parts.version, &parts.headers);
    let connection = noted.connection;
    let keep_alive = match version {
        Version::HTTP_10 => connection && headers::has_token(map, header::CONNECTION, "keep-alive"),
        _ => !(connection && headers::has_token(map, header::CONNECTION, "close")),
    };
    let expect_continue = noted.expect
        && version == Version::HTTP_11
        && map
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let upgrade = noted.upgrade
        && connection
        && version == Version::HTTP_11
        && parts.method == Method::GET
        && framing == Framing::Empty
        && headers::is_websocket_upgrade(map);
    let reply = Reply {
        version,
        head_method: parts.method == Method::HEAD,
        keep_alive,
    };
    RequestHead {
        parts,
        framing,
        reply,
        expect_continue,
        upgrade,
    }
}

/// The largest response head accepted.
pub const MAX_RESPONSE_HEAD: usize = 64 << 10;

/// A response head, read.
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the connection can carry another request after this response.
    pub keep_alive: bool,
}

/// What is asked of a response: its request's method decides whether it has a body, and a
/// `101 Switching Protocols` is taken only in answer to an upgrade.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    pub head_method: bool,
    pub upgrade: bool,
}

/// httparse's reading of the response head at the front of `buf`.
fn scan_response<'h, 'b>(
    buf: &'b [u8],
    fields: &'h mut Fields<'b>,
) -> (httparse::Result<usize>, httparse::Response<'h, 'b>) {
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        fields,
    );
    (parsed, response)
}

/// Parses a complete response head off the front of `buf`; None while it is incomplete.
pub fn parse_response(
    buf: &mut BytesMut,
    asked: Asked,
) -> Result<Option<ResponseHead>, &'static str> {
    let mut fields = no_fields();
    let (parsed, response) = scan_response(buf, &mut fields);
    let length = match parsed {
        // A head that arrived whole in one read is held to the limit too.
        Ok(httparse::Status::Complete(length)) if length > MAX_RESPONSE_HEAD => {
            return Err("the response head is larger than 64 KiB");
        }
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("the response head does not parse as HTTP/1.1"),
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or("invalid response status")?;
    let version = version(response.version);
    let spans = Spans::new(buf, response.headers)?;
    let head = split_head(buf, length);
    let (headers, noted) = spans.header_map(&head)?;
    if status == StatusCode::SWITCHING_PROTOCOLS && !asked.upgrade {
        return Err("the upstream switched protocols unasked");
    }
    let framing = if framing::bodiless(asked.head_method, status) {
        Framing::Empty
    } else if noted.framed {
        match framing::from_fields(&headers, version)? {
            Framing::Empty => Framing::Close,
            framing => framing,
        }
    } else {
        Framing::Close
    };
    let keep_alive = version == Version::HTTP_11
        && framing != Framing::Close
        && !(noted.connection && headers::has_token(&headers, header::CONNECTION, "close"));
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// Drops whole interim heads off the front of `buf`, and says whether what is left begins a
/// final response (or something that is not a response at all).
pub fn answer_begun(buf: &mut BytesMut) -> bool {
    let interim = |code: u16| (100..200).contains(&code) && code != 101;
    loop {
        if buf.is_empty() {
            return false;
        }
        let mut fields = no_fields();
        let (parsed, response) = scan_response(buf, &mut fields);
        match (parsed, response.code) {
            (Ok(httparse::Status::Complete(length)), Some(code)) if interim(code) => {
                let _ = buf.split_to(length);
            }
            // The status line is not all there yet, or says nothing final yet.
            (Ok(httparse::Status::Partial), None) => return false,
            (Ok(httparse::Status::Partial), Some(code)) if interim(code) => return false,
            _ => return true,
        }
    }
}

/// Writes the head of the response to `reply`, its framing fields from its own (a usable
/// Content-Length) or else from the body's `exact` length. Returns how the body goes on the
/// wire, and whether the connection can carry another request after it.
pub fn write_response(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    reply: &Reply,
    exact: Option<u64>,
) -> (Framing, bool) {
    let status = parts.status;
    out.extend_from_slice(match reply.version {
        Version::HTTP_10 => b"HTTP/1.0 ",
        _ => b"HTTP/1.1 ",
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let written = write_response_fields(out, &parts.headers);
    let mut keep = reply.keep_alive && !written.close;
    let framing = if framing::bodiless(reply.head_method, status) {
        Framing::Empty
    } else if let Some(n) = written.length.or(exact) {
        Framing::Length(n)
    } else if reply.version == Version::HTTP_11 {
        Framing::Chunked
    } else {
        keep = false;
        Framing::Close
    };
    if written.length.is_none() {
        write_framing(out, framing);
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if reply.version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !written.dated {
        out.extend_from_slice(b"date: ");
        date::write(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, keep)
}

/// What a response's own fields said of its framing, noted as they were written.
struct Written {
    /// Its Content-Length, the first usable one.
    length: Option<u64>,
    close: bool,
    dated: bool,
}

/// Writes a response's fields in one pass, but for those this hop frames itself: Connection,
/// Transfer-Encoding, and Content-Length past the first usable one.
fn write_response_fields(out: &mut Vec<u8>, fields: &HeaderMap) -> Written {
    let mut written = Written {
        length: None,
        close: false,
        dated: false,
    };
    for (name, value) in fields {
        if name == header::CONNECTION {
            written.close |= headers::lists(value, "close");
            continue;
        }
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            match value.to_str().ok().and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if written.length.is_none() => written.length = Some(n),
                // Unusable or repeated: the length is written from what is known.
                _ => continue,
            }
        }
        written.dated |= name == header::DATE;
        write_field(out, name, value);
    }
    written
}

/// Writes the field that frames a body of `framing` on the wire, if it needs one.
pub fn write_framing(out: &mut Vec<u8>, framing: Framing) {
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty | Framing::Close => {}
    }
}

/// The Date field, formatted once a second per thread rather than once a response.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub fn write(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with_borrow_mut(|(at, text)| {
            if *at != second || text.is_empty() {
                *at = second;
                *text = httpdate::fmt_http_date(now);
            }
            out.extend_from_slice(text.as_bytes());
        });
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn parse(wire: &[u8]) -> Result<Option<(RequestHead, usize)>, ()> {
        let mut buf = BytesMut::from(wire);
        match parse_request(&mut buf) {
            Ok(Some(head)) => Ok(Some((head, wire.len() - buf.len()))),
            Ok(None) => Ok(None),
            Err(_) => Err(()),
        }
    }

    proptest! {
        /// A valid request head is incomplete at every cut, and whole at its end: what is taken
        /// is what httparse says the head is, field for field, and the bytes after it are left
        /// for the body.
        #[test]
        fn request_heads_cut_anywhere_then_whole(
            method in prop_oneof![Just("GET"), Just("POST"), Just("DELETE")],
            path in "/v1/[a-z0-9/._-]{0,30}",
            fields in prop::collection::vec(("x-[a-z]{1,10}", "[ -~]{0,20}"), 0..6),
            cut in any::<prop::sample::Index>(),
            body in prop::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut wire = format!("{method} {path} HTTP/1.1\r\nHost: proxy\r\n");
            for (name, value) in &fields {
                wire.push_str(&format!("{name}: {}\r\n", value.trim()));
            }
            wire.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            let head_len = wire.len();
            let mut wire = wire.into_bytes();
            wire.extend_from_slice(&body);
            let cut = cut.index(head_len);
            prop_assert!(matches!(parse(&wire[..cut]), Ok(None)), "cut at {cut}");

            let (head, taken) = parse(&wire).unwrap().expect("a whole head");
            let mut reference = [httparse::EMPTY_HEADER; 16];
            let mut request = httparse::Request::new(&mut reference);
            let status = request.parse(&wire).unwrap();
            prop_assert_eq!(status, httparse::Status::Complete(taken));
            prop_assert_eq!(taken, head_len);
            prop_assert_eq!(head.parts.method.as_str(), request.method.unwrap());
            prop_assert_eq!(head.parts.uri.to_string(), request.path.unwrap());
            for field in request.headers.iter() {
                let got: Vec<_> = head.parts.headers.get_all(field.name).iter().map(|v| v.as_bytes()).collect();
                prop_assert!(got.contains(&field.value), "{}", field.name);
            }
            prop_assert_eq!(head.framing, Framing::Length(body.len() as u64));
        }

        /// Whatever a mutation does to a head's framing fields or request line, a head is
        /// either refused or taken exactly as httparse reads it, with framing that
        /// framing::from_fields would give it.
        #[test]
        fn mutated_heads_are_refused_or_read_as_httparse_does(
            line in prop_oneof![Just("GET / HTTP/1.1"), Just("get / HTTP/1.1"), Just("GET  / HTTP/1.1"),
                Just("GET / HTTP/1.0"), Just("GET / HTTP/2.0"), Just("G\u{7f}T / HTTP/1.1")],
            framing in prop::collection::vec(prop_oneof![
                Just("Content-Length: 3"), Just("Content-Length: 3, 3"), Just("Content-Length: -3"),
                Just("Transfer-Encoding: chunked"), Just("Transfer-Encoding: gzip"),
                Just("Transfer-Encoding : chunked"), Just("Content-Length:3"),
                Just("Host: other"), Just(" folded: x")], 0..4),
        ) {
            let mut wire = format!("{line}\r\nHost: proxy\r\n");
            for field in &framing {
                wire.push_str(field);
                wire.push_str("\r\n");
            }
            wire.push_str("\r\n");
            let mut reference = [httparse::EMPTY_HEADER; 16];
            let mut request = httparse::Request::new(&mut reference);
            let parsed = request.parse(wire.as_bytes());
            match parse(wire.as_bytes()) {
                Ok(Some((head, taken))) => {
                    prop_assert_eq!(parsed, Ok(httparse::Status::Complete(taken)));
                    let expected = framing::from_fields(&head.parts.headers, head.parts.version);
                    prop_assert_eq!(Ok(head.framing), expected);
                    prop_assert_eq!(head.parts.headers.get_all(header::HOST).iter().count(), 1);
                    prop_assert!(head.parts.method.as_str().bytes().all(|b| b.is_ascii_uppercase()));
                }
                Ok(None) => prop_assert!(false, "a whole head taken as incomplete: {wire:?}"),
                Err(()) => {}
            }
        }
    }
}
