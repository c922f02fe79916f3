//! HTTP/1.1, one codec for both sides of the proxy: requests read off client connections and
//! responses written back on them (`server`), requests written to upstream connections and
//! responses read off them (`upstream::http1`, built from the parts here). HTTP/2 stays with
//! hyper; `http2` holds what its server needs besides.
//!
//! - `io`: the byte streams (`Io`, `BoxIo`) and `Rewind`, a stream with bytes put back in front.
//! - `head`: one parser for request and response heads, and the writer of head fields.
//! - `framing`: how a body is delimited, and its decoder.
//! - `wire`: one body reader, for a body read straight off a connection, and its `ReadError`.
//! - `encode`: one encoder and pump, for a body written onto a connection.
//! - `server`: the HTTP/1.1 server loop, generic over a `Handler`.
//!
//! Nothing here knows the proxy: the server hands each request to its `Handler`.
//!
//! Futures that hold a request's state are boxed where they are awaited (`Box::pin`): a task is
//! as large as its largest state, and a connection waiting for its next request should be small.

mod encode;
pub mod framing;
pub mod head;
pub mod http2;
mod io;
pub mod server;
#[cfg(test)]
mod tests;
mod wire;

pub use encode::{Encoder, Outlet, pump};
pub use framing::{Framing, ReadError};
pub use io::{BoxIo, Rewind};
pub use server::{Activity, IncomingBody, OnUpgrade, Settings, Stage};
pub use wire::{Carrier, WireBody};
