//! The parts every integration test uses, one module a role: certificates made for the test
//! (`pki`); fake OpenAI upstreams (`fake_upstream`) and raw TCP ones (`raw_upstream`); the real
//! proxy binary as a child process (`proxy`) and the notify socket that records what it tells
//! systemd (`notify`); an HTTP client of the proxy (`client`) and raw HTTP/1.1 (`wire`); config
//! and tokens files (`config`); other programs the tests start (`daemon`); bounded waits
//! (`wait`). Everything is re-exported here, so a test says `use common::*`.
#![allow(dead_code, unused_imports)]

mod client;
mod config;
mod daemon;
mod fake_upstream;
mod notify;
mod pki;
mod proxy;
mod raw_upstream;
mod wait;
mod wire;

pub use client::*;
pub use config::*;
pub use daemon::*;
pub use fake_upstream::*;
pub use notify::*;
pub use pki::*;
pub use proxy::*;
pub use raw_upstream::*;
pub use wait::*;
pub use wire::*;

/// The proxy binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_openai-proxy");
