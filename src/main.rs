//! openai-proxy's command line; the daemon and everything else live in the library.
#![deny(unsafe_code)]
#![warn(clippy::too_many_lines)]

use std::process::ExitCode;

use openai_proxy::cli::{self, Command};
use openai_proxy::{daemon, limits, outcome, tokens};

/// Every request allocates and frees a little; mimalloc serves that from thread-local pages
/// (the measurement behind the choice is in bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args_os().skip(1)) {
        Ok(command) => command,
        Err(error) => {
            eprintln!("openai-proxy: {error}\n\n{}", cli::HELP);
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            print!("{}", cli::HELP);
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("openai-proxy {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check { config } => daemon::check(&config),
        Command::Reload { pid } => match outcome::request(pid) {
            Ok(message) => {
                println!("openai-proxy: {message}");
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("openai-proxy: reload failed: {message}");
                ExitCode::FAILURE
            }
        },
        Command::TokenNew { name } => match tokens::new_token(&name) {
            Ok(text) => {
                print!("{text}");
                eprintln!(
                    "openai-proxy: the first line is the token, for the client (it is kept nowhere \
                     else); add the table to the tokens_file"
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("openai-proxy: {error}");
                ExitCode::from(2)
            }
        },
        Command::Usage {
            config,
            since,
            token,
        } => match limits::report::table(&config, since.as_deref(), token.as_deref()) {
            Ok(table) => {
                print!("{table}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("openai-proxy: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => daemon::run(config),
    }
}
