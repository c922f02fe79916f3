//! The command line: `openai-proxy [check] [--config PATH]`, `token new NAME`, `--version`,
//! `--help`.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config::DEFAULT_PATH;

pub const HELP: &str = "\
openai-proxy: a reverse proxy for the OpenAI API

Usage:
  openai-proxy [--config PATH]          run the proxy
  openai-proxy check [--config PATH]    validate the config (and the files it names), then exit
  openai-proxy token new NAME           print a new client token, then the [[token]] table that
                                        lets it in (for the tokens_file of [auth] mode = \"tokens\")
  openai-proxy --version | --help

Options:
  -c, --config PATH   the config file [default: /etc/openai-proxy/config.toml]

Signals:
  SIGHUP             reload the config; a broken one is refused and the running one keeps serving
  SIGTERM, SIGINT    stop accepting, let requests and streams in flight finish, exit;
                     a second one exits at once
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run { config: PathBuf },
    Check { config: PathBuf },
    TokenNew { name: String },
    Help,
    Version,
}

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let args: Vec<OsString> = args.into_iter().collect();
    if args.first().is_some_and(|a| a == "token") {
        return match &args[1..] {
            [new, name] if new == "new" => Ok(Command::TokenNew {
                name: name.to_string_lossy().into_owned(),
            }),
            _ => Err("usage: openai-proxy token new NAME".into()),
        };
    }
    let mut check = false;
    let mut config = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        match text.as_ref() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "check" if !check => check = true,
            "-c" | "--config" => {
                let path = args.next().ok_or("--config needs a path")?;
                config = Some(PathBuf::from(path));
            }
            other => match other.strip_prefix("--config=") {
                Some(path) => config = Some(PathBuf::from(path)),
                None => return Err(format!("unexpected argument {other:?}")),
            },
        }
    }
    let config = config.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    // Relative paths would break once the file watcher or a reload runs from elsewhere.
    let config = std::path::absolute(&config).unwrap_or(config);
    Ok(if check {
        Command::Check { config }
    } else {
        Command::Run { config }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn commands() {
        assert_eq!(
            parse(args(&[])).unwrap(),
            Command::Run {
                config: DEFAULT_PATH.into()
            }
        );
        assert_eq!(
            parse(args(&["check", "--config", "/x.toml"])).unwrap(),
            Command::Check {
                config: "/x.toml".into()
            }
        );
        assert_eq!(
            parse(args(&["--config=/y.toml"])).unwrap(),
            Command::Run {
                config: "/y.toml".into()
            }
        );
        assert_eq!(parse(args(&["--version"])).unwrap(), Command::Version);
        assert!(parse(args(&["--config"])).is_err());
        assert!(parse(args(&["serve"])).is_err());
        assert_eq!(
            parse(args(&["token", "new", "alice"])).unwrap(),
            Command::TokenNew {
                name: "alice".into()
            }
        );
        assert!(parse(args(&["token", "new"])).is_err());
        assert!(parse(args(&["token", "revoke", "alice"])).is_err());
    }
}
