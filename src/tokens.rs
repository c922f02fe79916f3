//! The token store of tokens mode: the upstream key, and the tokens listed in `tokens_file`,
//! known by the SHA-256 of each token and by their names.
//!
//! Built once per generation from `[auth]`; what a request presents is checked against it by
//! the proxy's request filter (`proxy::auth`). Neither the key nor a token is ever logged, put in
//! an error or a `STATUS=` line: errors here name files and tokens by name, never by content.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use http::HeaderValue;
use serde::Deserialize;
use toml::Spanned;

use crate::config::auth::{Config, Mode};
use crate::config::{ConfigError, ConfigFile, FileRead, days_from_civil};
use crate::models::ModelRule;

/// How a browser passes a key or token: as the WebSocket subprotocol `PREFIX` + key.
pub const SUBPROTOCOL_PREFIX: &str = "openai-insecure-api-key.";

/// The upstream key, as the two forms it is sent in. No Debug: it must not be printable.
pub struct Key {
    /// `Bearer KEY`, marked sensitive so that HTTP/2 never puts it in a compression table.
    pub bearer: HeaderValue,
    /// The WebSocket subprotocol form, `openai-insecure-api-key.KEY`.
    pub subprotocol: String,
}

/// One client token, known by its name; the token itself is kept nowhere.
#[derive(Debug)]
pub struct Token {
    pub name: Arc<str>,
    /// None: any model. Each entry is a model name, or a prefix when it ended in `*`.
    models: Option<Vec<ModelRule>>,
    /// Seconds since the Unix epoch after which the token is refused.
    expires: Option<i64>,
    /// Its own limits; those it leaves out are `[limits]`'s.
    pub quota: crate::limits::Quota,
}

impl Token {
    pub fn allows(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|rules| rules.iter().any(|rule| rule.matches(model)))
    }

    pub fn restricts_models(&self) -> bool {
        self.models.is_some()
    }

    pub fn has_expired(&self) -> bool {
        self.expires.is_some_and(|at| now_unix() >= at)
    }
}

/// Everything tokens mode needs, built once per generation.
pub struct Tokens {
    pub key: Key,
    /// Keyed by SHA-256 of the token. The lookup's timing depends only on the digest of what the
    /// client sent, and learning bits of SHA-256(guess) tells nothing about which other input
    /// would hash to a listed digest (preimage resistance); with 256-bit random tokens there is
    /// no guessing either. So this is as safe as a constant-time comparison against every hash.
    by_digest: HashMap<[u8; 32], Arc<Token>>,
    /// Sent upstream as OpenAI-Organization and OpenAI-Project.
    pub organization: Option<HeaderValue>,
    pub project: Option<HeaderValue>,
}

impl Tokens {
    /// The listed token that `presented` is, if it is one.
    pub fn find(&self, presented: &[u8]) -> Option<&Arc<Token>> {
        let digest = ring::digest::digest(&ring::digest::SHA256, presented);
        let digest: [u8; 32] = digest.as_ref().try_into().expect("SHA-256 is 32 bytes");
        self.by_digest.get(&digest)
    }
}

/// Builds tokens mode from the config, reading the key file and the tokens file (returned, with
/// their contents, for the file watcher). Passthrough mode reads nothing.
pub fn load(
    config: &Config,
    file: &ConfigFile,
) -> Result<(Option<Tokens>, Vec<FileRead>), ConfigError> {
    if config.mode == Mode::Passthrough {
        return Ok((None, Vec::new()));
    }
    let (Some(key_file), Some(tokens_file)) = (&config.upstream_key_file, &config.tokens_file)
    else {
        return Err(ConfigError::File {
            path: file.path.clone(),
            message: "[auth] mode = \"tokens\" needs both upstream_key_file and tokens_file".into(),
        });
    };
    let (key, key_read) = file.read_secret_as(key_file, "the key file", parse_key)?;
    let (tokens_path, tokens_bytes) = file.read_named(tokens_file)?;
    let by_digest = parse_tokens(tokens_path.clone(), &tokens_bytes)?;
    let header = |value: &Option<Spanned<String>>| {
        value
            .as_ref()
            .map(|v| {
                HeaderValue::from_str(v.get_ref())
                    .map_err(|_| file.error_at(v.span(), "not a valid header value"))
            })
            .transpose()
    };
    let tokens = Tokens {
        key,
        by_digest,
        organization: header(&config.organization)?,
        project: header(&config.project)?,
    };
    Ok((Some(tokens), vec![key_read, (tokens_path, tokens_bytes)]))
}

/// The key is the file's one line; what is wrong is said without quoting any of it.
fn parse_key(bytes: &[u8]) -> Result<Key, &'static str> {
    let key = crate::keys::key_line(bytes)?;
    let mut bearer =
        HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| "it is not a key")?;
    bearer.set_sensitive(true);
    Ok(Key {
        bearer,
        subprotocol: format!("{SUBPROTOCOL_PREFIX}{key}"),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: Spanned<String>,
    sha256: Spanned<String>,
    models: Option<Vec<Spanned<String>>>,
    expires: Option<Spanned<toml::value::Datetime>>,
    requests_per_minute: Option<crate::limits::Limit>,
    tokens_per_minute: Option<crate::limits::Limit>,
    tokens_per_day: Option<crate::limits::Limit>,
    max_concurrent: Option<crate::limits::Limit>,
}

/// The tokens file, checked whole: one bad entry refuses the file, with its line and column.
fn parse_tokens(path: PathBuf, bytes: &[u8]) -> Result<HashMap<[u8; 32], Arc<Token>>, ConfigError> {
    let text = String::from_utf8(bytes.to_vec()).map_err(|_| ConfigError::File {
        path: path.clone(),
        message: "not UTF-8 text".into(),
    })?;
    let file = ConfigFile::new(path, text);
    let entries: TokensFile = file.deserialize()?;
    let mut by_digest = HashMap::with_capacity(entries.token.len());
    let mut names = std::collections::HashSet::new();
    for entry in entries.token {
        let name = entry.name.get_ref().trim();
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(file.error_at(entry.name.span(), "a token's name is a word or two"));
        }
        if !names.insert(name.to_owned()) {
            return Err(file.error_at(entry.name.span(), format!("{name:?} is named twice")));
        }
        let digest = parse_digest(entry.sha256.get_ref())
            .ok_or_else(|| file.error_at(entry.sha256.span(), "sha256 is 64 hex digits"))?;
        let models = match entry.models {
            Some(models) => Some(
                models
                    .iter()
                    .map(|m| ModelRule::parse(m.get_ref()).map_err(|e| file.error_at(m.span(), e)))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        let expires = match entry.expires {
            Some(at) => Some(unix_seconds(at.get_ref()).map_err(|e| file.error_at(at.span(), e))?),
            None => None,
        };
        let token = Token {
            name: name.into(),
            models,
            expires,
            quota: crate::limits::Quota {
                requests_per_minute: entry.requests_per_minute,
                tokens_per_minute: entry.tokens_per_minute,
                tokens_per_day: entry.tokens_per_day,
                max_concurrent: entry.max_concurrent,
            },
        };
        if by_digest.insert(digest, Arc::new(token)).is_some() {
            return Err(file.error_at(entry.sha256.span(), "this sha256 is listed twice"));
        }
    }
    Ok(by_digest)
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(text.chunks(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(digest)
}

/// A TOML date-time as seconds since the Unix epoch: a date alone is its midnight UTC; a
/// date-time needs its offset (`Z` for UTC), since the proxy's time zone is nobody's guess.
fn unix_seconds(at: &toml::value::Datetime) -> Result<i64, String> {
    use toml::value::Offset;
    let date = at.date.ok_or("expires is a date, or a date and time")?;
    let (seconds_of_day, offset_minutes) = match (at.time, at.offset) {
        (None, _) => (0, 0),
        (Some(_), None) => return Err("give the time's offset, e.g. 2027-01-01T00:00:00Z".into()),
        (Some(time), Some(offset)) => (
            i64::from(time.hour) * 3600
                + i64::from(time.minute) * 60
                + i64::from(time.second.unwrap_or(0)),
            match offset {
                Offset::Z => 0,
                Offset::Custom { minutes } => i64::from(minutes),
            },
        ),
    };
    let days = days_from_civil(
        i64::from(date.year),
        i64::from(date.month),
        i64::from(date.day),
    );
    Ok(days * 86_400 + seconds_of_day - offset_minutes * 60)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `openai-proxy token new NAME`: a new random token on the first line, then the `[[token]]`
/// table that lets it in. The token is printed once and stored nowhere.
pub fn new_token(name: &str) -> Result<String, String> {
    use ring::rand::SecureRandom;
    let name = name.trim();
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err("a token's name is a word or two, e.g. alice or billing-app".into());
    }
    let mut random = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| "the system's random source failed")?;
    let token = format!("{TOKEN_PREFIX}{}", crate::keys::hex(&random));
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let quoted_name = toml::Value::String(name.to_owned()).to_string();
    Ok(format!(
        "{token}\n\n[[token]]\nname = {quoted_name}\nsha256 = \"{}\"\n\
         # models = [\"gpt-4o-mini\", \"gpt-4.1*\"]\n# expires = 2027-01-01T00:00:00Z\n",
        crate::keys::hex(digest.as_ref())
    ))
}

/// What every token this proxy issues starts with, so that one found lying about is recognised.
const TOKEN_PREFIX: &str = "op-";

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> Result<HashMap<[u8; 32], Arc<Token>>, ConfigError> {
        parse_tokens(
            PathBuf::from("/etc/openai-proxy/tokens.toml"),
            text.as_bytes(),
        )
    }

    const HASH: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn tokens_file_entries() {
        let set = tokens(&format!(
            "[[token]]\nname = \"alice\"\nsha256 = \"{HASH}\"\nmodels = [\"gpt-4o-mini\", \"gpt-4.1*\"]\nexpires = 2027-01-01T00:00:00Z\n"
        ))
        .unwrap();
        let alice = set.values().next().unwrap();
        assert_eq!(&*alice.name, "alice");
        assert!(alice.allows("gpt-4o-mini"));
        assert!(alice.allows("gpt-4.1-nano"));
        assert!(!alice.allows("gpt-4o"));
        assert_eq!(alice.expires, Some(1_798_761_600));
        let digest = ring::digest::digest(&ring::digest::SHA256, b"hello");
        assert!(set.contains_key(digest.as_ref()));
    }

    #[test]
    fn broken_tokens_files_name_line_and_column() {
        let cases = [
            ("[[token]]\nname = \"a\"\nsha256 = \"abc\"\n", ":3:10: "),
            (
                "[[token]]\nname = \"a\"\nsha256 = \"x\"\ncolour = 1\n",
                ":4:1: ",
            ),
            (
                &format!("[[token]]\nname = \"a\"\nsha256 = \"{HASH}\"\nmodels = [\"g*pt\"]\n"),
                ":4:11: ",
            ),
            (
                &format!(
                    "[[token]]\nname = \"a\"\nsha256 = \"{HASH}\"\n[[token]]\nname = \"b\"\nsha256 = \"{HASH}\"\n"
                ),
                ":6:10: ",
            ),
            (
                &format!(
                    "[[token]]\nname = \"a\"\nsha256 = \"{HASH}\"\nexpires = 2027-01-01T00:00:00\n"
                ),
                ":4:11: ",
            ),
        ];
        for (text, at) in cases {
            let error = tokens(text).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("/etc/openai-proxy/tokens.toml{at}")),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn dates_count_from_the_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        let at: toml::value::Datetime = "2027-01-01T01:00:00+01:00".parse().unwrap();
        assert_eq!(unix_seconds(&at), Ok(1_798_761_600));
    }

    #[test]
    fn new_tokens_are_listed_by_their_hash() {
        let out = new_token("alice smith").unwrap();
        let token = out.lines().next().unwrap();
        assert!(token.starts_with("op-") && token.len() == 3 + 64, "{token}");
        let set = tokens(&out[token.len()..]).unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        assert_eq!(&*set[digest.as_ref()].name, "alice smith");
        assert_ne!(new_token("alice").unwrap(), new_token("alice").unwrap());
        assert!(new_token(" ").is_err());
    }

    #[test]
    fn a_key_is_one_line() {
        assert!(parse_key(b"sk-abc\n").is_ok());
        assert!(parse_key(b"\n").is_err());
        assert!(parse_key(b"sk-abc\nsk-def\n").is_err());
        let key = parse_key(b"sk-abc").unwrap();
        assert_eq!(key.bearer, "Bearer sk-abc");
        assert!(key.bearer.is_sensitive());
        assert_eq!(key.subprotocol, "openai-insecure-api-key.sk-abc");
    }
}
