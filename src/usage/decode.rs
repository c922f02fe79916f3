//! Content-encoded answers (gzip, deflate, br) decoded as their bytes pass, for the scanners
//! alone: what the client gets is never touched. The decoded text goes out through one small
//! buffer per thread; the memory a body holds is its decoder's state (deflate's 32 KiB window
//! and tables; a br stream's window, grown only as far as the text decoded so far, up to the
//! 16 MiB a standard stream may ask for).

use std::cell::RefCell;

use brotli_decompressor::{BrotliDecompressStream, BrotliResult, BrotliState, StandardAlloc};
use flate2::{Decompress, FlushDecompress, Status};
use http::{HeaderMap, header};

/// How much decoded text one pass of a decoder hands on at most.
const OUT: usize = 8 << 10;
/// Inflaters kept per thread for the next deflate bodies.
const SPARE_INFLATERS: usize = 2;

thread_local! {
    /// Where decoders write: a body's text is handed on before its `feed` returns.
    static OUT_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; OUT].into_boxed_slice());
    /// Inflaters of bodies that ended: a new one costs more than a body of a few KiB to
    /// inflate (its 43 KiB of state is built, copied and zeroed), a reset one only the zeroing.
    static SPARES: RefCell<Vec<Decompress>> = const { RefCell::new(Vec::new()) };
}

/// An inflater for a zlib-wrapped or a raw deflate stream.
fn inflater(zlib: bool) -> Decompress {
    match SPARES.with_borrow_mut(Vec::pop) {
        Some(mut spare) => {
            spare.reset(zlib);
            spare
        }
        None => Decompress::new(zlib),
    }
}

/// The stage after the stream: an inflater goes to the spares.
fn end(stage: &mut Stage) {
    if let Stage::Inflate(done) = std::mem::replace(stage, Stage::End) {
        // At a thread's exit the spares are gone: the inflater is then dropped.
        let _ = SPARES.try_with(|spares| {
            let mut spares = spares.borrow_mut();
            if spares.len() < SPARE_INFLATERS {
                spares.push(done);
            }
        });
    }
}

/// Why a body is not read: content-encoded in a way not decoded here (unknown, or stacked).
pub const COMPRESSED: &str = "compressed";
/// Why a body is not read: not a valid stream of its encoding.
pub const CORRUPT: &str = "corrupt";
/// Why a body is not read: its decoded text went past the decoder's bound.
pub const OVERSIZED: &str = "oversized";

/// The encodings decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// zlib-wrapped as RFC 9110 says, or raw deflate, as some servers send it and browsers take.
    Deflate,
    Brotli,
}

/// How an answer's body is encoded, from its `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Coded(Coding),
    /// An encoding not decoded here, or more than one stacked.
    Other,
}

impl Encoding {
    pub fn of(headers: &HeaderMap) -> Self {
        let mut codings = headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|name| !name.is_empty() && !name.eq_ignore_ascii_case(b"identity"));
        let Some(name) = codings.next() else {
            return Self::Identity;
        };
        let named = |known: &[u8]| name.eq_ignore_ascii_case(known);
        let coding = if named(b"gzip") || named(b"x-gzip") {
            Coding::Gzip
        } else if named(b"deflate") {
            Coding::Deflate
        } else if named(b"br") {
            Coding::Brotli
        } else {
            return Self::Other;
        };
        match codings.next() {
            None => Self::Coded(coding),
            Some(_) => Self::Other,
        }
    }
}

type Brotli = BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>;

enum Stage {
    /// In a gzip member's header, before its deflate stream.
    GzipHeader(GzipHeader),
    /// Before a deflate body's first two bytes, which tell a zlib header from raw deflate;
    /// holds the first once it has come.
    Sniff(Option<u8>),
    Inflate(Decompress),
    Brotli(Box<Brotli>),
    /// The stream ended; what follows (a gzip trailer) is not read.
    End,
}

/// One body's decoder: compressed bytes in, decoded text out to a sink.
pub struct Decoder {
    stage: Stage,
    /// How much more decoded text is read; past it the decoder gives up.
    room: u64,
}

impl Decoder {
    /// A decoder that gives up once it has decoded more than `limit` bytes.
    pub fn new(coding: Coding, limit: u64) -> Self {
        let stage = match coding {
            Coding::Gzip => Stage::GzipHeader(GzipHeader::default()),
            Coding::Deflate => Stage::Sniff(None),
            // Standard windows only (up to 16 MiB): large-window streams are not HTTP's br.
            Coding::Brotli => Stage::Brotli(Box::new(Brotli::new_strict(
                StandardAlloc::default(),
                StandardAlloc::default(),
                StandardAlloc::default(),
            ))),
        };
        Self { stage, room: limit }
    }

    /// The next bytes of the body: their decoded text goes to `sink`, in pieces of any size.
    /// An error is why the rest cannot be read (`CORRUPT`, `OVERSIZED`); the decoder is then
    /// of no further use.
    pub fn feed(&mut self, data: &[u8], sink: &mut impl FnMut(&[u8])) -> Result<(), &'static str> {
        OUT_BUFFER.with_borrow_mut(|out| self.feed_through(data, out, sink))
    }

    fn feed_through(
        &mut self,
        mut data: &[u8],
        out: &mut [u8],
        sink: &mut impl FnMut(&[u8]),
    ) -> Result<(), &'static str> {
        let Self { stage, room } = self;
        // The text up to the bound is read, then no more.
        let mut emit = |text: &[u8]| -> Result<(), &'static str> {
            let fits = text.len().min(usize::try_from(*room).unwrap_or(usize::MAX));
            *room -= fits as u64;
            sink(&text[..fits]);
            if fits < text.len() {
                return Err(OVERSIZED);
            }
            Ok(())
        };
        while !data.is_empty() {
            match stage {
                Stage::GzipHeader(header) => {
                    data = header.skip(data)?;
                    if header.done() {
                        *stage = Stage::Inflate(inflater(false));
                    }
                }
                Stage::Sniff(None) => {
                    *stage = Stage::Sniff(Some(data[0]));
                    data = &data[1..];
                }
                Stage::Sniff(Some(first)) => {
                    let first = *first;
                    let mut inflater = inflater(zlib_header(first, data[0]));
                    // No deflate stream ends in its first byte.
                    inflate(&mut inflater, &[first], out, &mut emit)?;
                    *stage = Stage::Inflate(inflater);
                }
                Stage::Inflate(inflater) => {
                    if inflate(inflater, data, out, &mut emit)? {
                        end(stage);
                    }
                    data = &[];
                }
                Stage::Brotli(state) => {
                    if unbrotli(state, data, out, &mut emit)? {
                        end(stage);
                    }
                    data = &[];
                }
                Stage::End => data = &[],
            }
        }
        Ok(())
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        end(&mut self.stage);
    }
}

/// Whether two bytes are a zlib header (RFC 1950): deflate, a window of at most 32 KiB, and
/// the check bits.
fn zlib_header(cmf: u8, flg: u8) -> bool {
    cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0
}

/// Inflates all of `input`; whether the deflate stream ended in it.
fn inflate(
    inflater: &mut Decompress,
    mut input: &[u8],
    out: &mut [u8],
    emit: &mut impl FnMut(&[u8]) -> Result<(), &'static str>,
) -> Result<bool, &'static str> {
    loop {
        let (read, written) = (inflater.total_in(), inflater.total_out());
        let status = inflater
            .decompress(input, out, FlushDecompress::None)
            .map_err(|_| CORRUPT)?;
        let used = (inflater.total_in() - read) as usize;
        let made = (inflater.total_out() - written) as usize;
        input = &input[used..];
        emit(&out[..made])?;
        // More may wait while the output filled up; none while input is left but nothing moved
        // (which a valid stream never does).
        let more = made == out.len() || !input.is_empty();
        match status {
            Status::StreamEnd => return Ok(true),
            _ if used == 0 && made == 0 && !input.is_empty() => return Err(CORRUPT),
            _ if !more => return Ok(false),
            _ => {}
        }
    }
}

/// Decodes all of `input` of a br stream; whether the stream ended in it.
fn unbrotli(
    state: &mut Brotli,
    input: &[u8],
    out: &mut [u8],
    emit: &mut impl FnMut(&[u8]) -> Result<(), &'static str>,
) -> Result<bool, &'static str> {
    let (mut available_in, mut input_offset) = (input.len(), 0);
    loop {
        let (mut available_out, mut output_offset, mut total_out) = (out.len(), 0, 0);
        let result = BrotliDecompressStream(
            &mut available_in,
            &mut input_offset,
            input,
            &mut available_out,
            &mut output_offset,
            out,
            &mut total_out,
            state,
        );
        emit(&out[..output_offset])?;
        match result {
            BrotliResult::ResultSuccess => return Ok(true),
            BrotliResult::NeedsMoreInput => return Ok(false),
            BrotliResult::NeedsMoreOutput => {}
            BrotliResult::ResultFailure => return Err(CORRUPT),
        }
    }
}

/// Where a gzip member's header (RFC 1952) stands: a fixed part of ten bytes, then the fields
/// its flags announce, in order: extra (length-prefixed), name and comment (each ended by a
/// zero byte), header CRC (two bytes). None of it is kept.
#[derive(Default)]
struct GzipHeader {
    /// Bytes of the fixed part seen.
    fixed: u8,
    /// The optional fields still to come.
    flags: u8,
    /// The extra field's length, once its first byte has come.
    extra_low: Option<u8>,
    /// Bytes still to skip in the current field.
    skip: u16,
}

const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;
const FIELDS: u8 = FHCRC | FEXTRA | FNAME | FCOMMENT;
/// Bits RFC 1952 reserves: a header with any of them set is refused.
const RESERVED: u8 = 0xe0;

impl GzipHeader {
    fn done(&self) -> bool {
        self.fixed == 10 && self.skip == 0 && self.flags & FIELDS == 0
    }

    /// Reads header bytes from `data`; what follows the header.
    fn skip<'a>(&mut self, mut data: &'a [u8]) -> Result<&'a [u8], &'static str> {
        while let Some((&byte, rest)) = data.split_first() {
            if self.done() {
                break;
            }
            data = rest;
            if self.fixed < 10 {
                match (self.fixed, byte) {
                    (0, 0x1f) | (1, 0x8b) | (2, 8) | (4.., _) => {}
                    (3, flags) if flags & RESERVED == 0 => self.flags = flags,
                    _ => return Err(CORRUPT),
                }
                self.fixed += 1;
            } else if self.skip > 0 {
                self.skip -= 1;
            } else if self.flags & FEXTRA != 0 {
                match self.extra_low.take() {
                    None => self.extra_low = Some(byte),
                    Some(low) => {
                        self.skip = u16::from_le_bytes([low, byte]);
                        self.flags &= !FEXTRA;
                    }
                }
            } else if self.flags & FNAME != 0 {
                if byte == 0 {
                    self.flags &= !FNAME;
                }
            } else if self.flags & FCOMMENT != 0 {
                if byte == 0 {
                    self.flags &= !FCOMMENT;
                }
            } else {
                // The CRC's first byte; its second is skipped.
                self.flags &= !FHCRC;
                self.skip = 1;
            }
        }
        Ok(data)
    }
}
