//! benchtool: the programs openai-proxy's benchmark runs beside the proxies it compares.
//!
//!   benchtool certs DIR                      a CA made for the run, and a cert for api.openai.com
//!   benchtool upstream --listen ADDR ...     the fake OpenAI API over TLS (HTTP/1.1 and h2)
//!   benchtool streams --url URL ...          hundreds of concurrent SSE streams, timed per event
//!   benchtool hold --url URL --pids ...      thousands of idle keep-alive connections, RSS read
//!
//! Every command that generates load stops by itself: each has a count and a time limit.
//! Results are printed as one JSON object on stdout.

mod args;
mod certs;
mod client;
mod hold;
mod stats;
mod streams;
mod upstream;

use std::process::ExitCode;

const USAGE: &str = "usage: benchtool certs DIR
       benchtool upstream --listen ADDR --cert FILE --key FILE [--events N] [--interval-ms D]
                          [--threads T] [--max-streams S]
       benchtool streams --url URL [--ca FILE --server-name NAME] [--streams N] [--ramp-ms R]
                         [--interval-ms D] [--timeout-secs S] [--samples FILE]
       benchtool hold --url URL --conns N --pids PID,PID [--parallel P] [--settle-ms MS]
";

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let Some(command) = argv.next() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest: Vec<String> = argv.collect();
    let outcome = match command.as_str() {
        "certs" => certs::run(&rest),
        "upstream" => upstream::run(&rest),
        "streams" => streams::run(&rest),
        "hold" => hold::run(&rest),
        _ => Err(format!("unknown command {command:?}")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("benchtool {command}: {error}\n\n{USAGE}");
            ExitCode::FAILURE
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine, so the upstream
/// can stamp an event and the client can tell how long it took to arrive.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The request body every load generator sends: what an OpenAI SDK sends for a short chat.
pub fn request_body(stream: bool) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"Say hello in one short sentence."}}],"max_tokens":64,"stream":{stream}}}"#
    )
}

/// Looks like a real key in length and shape; the fake upstream never checks it.
pub const API_KEY: &str = "sk-bench-0000000000000000000000000000000000000000000000";
