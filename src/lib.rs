//! openai-proxy: a reverse proxy for the OpenAI API, run as a systemd daemon.
//!
//! The modules stand in layers, bottom to top; a module imports only from layers below it:
//! - leaves: `config` (the TOML and every section of it, plain data), `error`, `headers`,
//!   `drain`, `workers`, `metrics`, `outcome`, `usage`, `keys`, `models`, `cli`;
//! - `http`: the HTTP/1.1 codec both sides share (framing, heads, bodies), the HTTP/1.1 server
//!   generic over a `Handler`, and hyper's HTTP/2; then `body`, a request's body as it arrives;
//! - the upstream side: `upstream` (pool, dialer, TLS, its HTTP/1.1 client, egress), `tokens`
//!   (the token store), `routes`, `limits`;
//! - `generation`: one loaded config with everything built from it;
//! - one request's way through: `proxy`, in phases (request filter, upstream peer, upstream
//!   request filter, forward with failover, response filter, logging), with `tunnel`;
//! - serving: `server`, `admin`;
//! - `daemon`: the process's life (listeners, handover, systemd, reload, watch, logging).
//!
//! `.ci/layers.py` fails CI on any import cycle between top-level modules. Modules are public
//! only where the binary (`main.rs`: the command line) reaches into them.
#![deny(unsafe_code)]
#![warn(clippy::too_many_lines)]

mod admin;
mod body;
pub mod cli;
mod config;
pub mod daemon;
mod drain;
mod error;
mod generation;
mod headers;
mod http;
mod keys;
pub mod limits;
mod metrics;
mod models;
pub mod outcome;
mod proxy;
mod routes;
mod server;
pub mod tokens;
mod upstream;
mod usage;
mod workers;
