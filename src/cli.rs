//! The command line: `openai-proxy [check | reload PID] [--config PATH]`, `token new NAME`,
//! `--version`, `--help`.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config::DEFAULT_PATH;

pub const HELP: &str = "\
openai-proxy: a reverse proxy for the OpenAI API

Usage:
  openai-proxy [--config PATH]          run the proxy
  openai-proxy check [--config PATH]    validate the config (and the files it names), then exit
  openai-proxy reload PID               ask the proxy running as PID to reload (SIGHUP), and under
                                        systemd wait for the outcome: exit 0 once the new config
                                        (or, after an upgrade, the new process) serves, 1 if not
  openai-proxy token new NAME           print a new client token, then the [[token]] table that
                                        lets it in (for the tokens_file of [auth] mode = \"tokens\")
  openai-proxy usage [--since YYYY-MM-DD] [--token NAME] [--config PATH]
                                        print the usage per token and model (requests, prompt,
                                        completion, cached and reasoning tokens) from the limits
                                        backend, since that UTC day (default: all days kept)
  openai-proxy --version | --help

Options:
  -c, --config PATH   the config file [default: /etc/openai-proxy/config.toml]

Signals:
  SIGHUP             reload the config; a broken one is refused and the running one keeps serving;
                     if the binary on disk was replaced, hand over to it (as SIGUSR2)
  SIGUSR2            hand over to a new process from the binary on disk: it serves at once, this
                     one finishes its requests, streams and WebSockets, then exits
  SIGTERM, SIGINT, SIGQUIT
                     stop accepting, let requests and streams in flight finish, exit
                     (0, or 3 if something had to be cut); a second one cuts at once
  SIGUSR1, SIGALRM   logged and ignored
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run {
        config: PathBuf,
    },
    Check {
        config: PathBuf,
    },
    Reload {
        pid: u32,
    },
    TokenNew {
        name: String,
    },
    Usage {
        config: PathBuf,
        since: Option<String>,
        token: Option<String>,
    },
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
    if args.first().is_some_and(|a| a == "usage") {
        return parse_usage(&args[1..]);
    }
    let mut check = false;
    let mut reload = None;
    let mut config = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        match text.as_ref() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "check" if !check && reload.is_none() => check = true,
            "reload" if !check && reload.is_none() => {
                let pid = args
                    .next()
                    .ok_or("reload needs the PID of the running proxy")?;
                let pid = pid
                    .to_string_lossy()
                    .parse()
                    .map_err(|_| "reload: not a PID")?;
                reload = Some(pid);
            }
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
    if let Some(pid) = reload {
        return Ok(Command::Reload { pid });
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

/// `usage [--since YYYY-MM-DD] [--token NAME] [--config PATH]`.
fn parse_usage(args: &[OsString]) -> Result<Command, String> {
    let (mut since, mut token, mut config) = (None, None, None);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .map(|v| v.to_string_lossy().into_owned())
                .ok_or(format!("{} needs a value", arg.to_string_lossy()))
        };
        match arg.to_string_lossy().as_ref() {
            "--since" => since = Some(value()?),
            "--token" => token = Some(value()?),
            "-c" | "--config" => config = Some(PathBuf::from(value()?)),
            other => return Err(format!("usage: unexpected argument {other:?}")),
        }
    }
    Ok(Command::Usage {
        config: config.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH)),
        since,
        token,
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
        assert_eq!(
            parse(args(&["reload", "42"])).unwrap(),
            Command::Reload { pid: 42 }
        );
        assert!(parse(args(&["reload"])).is_err());
        assert!(parse(args(&["reload", "x"])).is_err());
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
        assert_eq!(
            parse(args(&["usage", "--since", "2026-12-01", "--token", "bob"])).unwrap(),
            Command::Usage {
                config: DEFAULT_PATH.into(),
                since: Some("2026-12-01".into()),
                token: Some("bob".into()),
            }
        );
        assert!(parse(args(&["usage", "--since"])).is_err());
    }
}
