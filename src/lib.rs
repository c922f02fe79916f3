//! openai-proxy: a reverse proxy for the OpenAI API, run as a systemd daemon.
//!
//! The modules stand in layers, bottom to top; a module imports only from layers below it:
//! - leaves: `config` (the TOML and every section of it, plain data), `error`, `headers`,
//!   `drain`, `workers`, `metrics`, `outcome`, `usage`, `keys`, `models`, `cli`;
//! - HTTP: `framing`, `body`, `http1`, `http2`;
//! - the upstream side: `upstream`, `routes`, `failover`, `limits`;
//! - `generation`: one loaded config with everything built from it;
//! - one request's way through: `proxy`, `auth`, `tunnel`, `access_log`;
//! - serving: `server`, `admin`;
//! - `daemon`: the process's life (listeners, handover, systemd, reload, watch, logging).
//!
//! `.ci/layers.py` fails CI on any import cycle between top-level modules. Modules are public
//! only where the binary (`main.rs`: the command line) reaches into them.
#![deny(unsafe_code)]
#![warn(clippy::too_many_lines)]

mod access_log;
mod admin;
pub mod auth;
mod body;
pub mod cli;
mod config;
pub mod daemon;
mod drain;
mod error;
mod failover;
mod framing;
mod generation;
mod headers;
mod http1;
mod http2;
mod keys;
pub mod limits;
mod metrics;
mod models;
pub mod outcome;
mod proxy;
mod routes;
mod server;
mod tunnel;
mod upstream;
mod usage;
mod workers;
