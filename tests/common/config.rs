//! Config and tokens files written for the test: configs pointing at the fake upstream, the
//! upstream key file, tokens issued by the binary.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::*;

/// A config whose upstream is a loopback port nothing listens on.
pub fn down_upstream_config(extra_upstream: &str) -> String {
    let port = free_port();
    format!(
        "listen = [\"127.0.0.1:0\"]\n[upstream]\nurl = \"https://127.0.0.1:{port}\"\nhost = \"api.openai.com\"\n{extra_upstream}"
    )
}

/// A plain listener and the fake upstream, as most tests want them.
pub fn basic_config(upstream: &FakeUpstream, pki: &Pki, extra: &str) -> String {
    format!(
        "listen = [\"127.0.0.1:0\"]\n{extra}\n{}",
        upstream.upstream_toml(pki)
    )
}

/// `config` (with an `[upstream]` table) offering HTTP/2 to the upstream, or not.
pub fn with_http2(config: &str, http2: bool) -> String {
    config.replace("[upstream]\n", &format!("[upstream]\nhttp2 = {http2}\n"))
}

// Tokens mode ([auth] mode = "tokens").

/// The proxy's own OpenAI key, as the key file holds it.
pub const UPSTREAM_KEY: &str = "sk-proj-UPSTREAM-SECRET-KEY-42";
pub const TOKENS_AUTH: &str = "[auth]\nmode = \"tokens\"\nupstream_key_file = \"openai-key\"\ntokens_file = \"tokens.toml\"\norganization = \"org-proxy\"\n";

/// A token made by `openai-proxy token new NAME`, and the `[[token]]` table it printed.
pub struct Issued {
    pub token: String,
    pub table: String,
}

pub fn issue(name: &str) -> Issued {
    let out = std::process::Command::new(BIN)
        .args(["token", "new", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (token, table) = text.split_once('\n').unwrap();
    assert!(token.starts_with("op-"), "{token}");
    Issued {
        token: token.to_owned(),
        table: table.to_owned(),
    }
}

/// Writes a file whole under a temporary name, then renames it over the old one, as careful
/// tools do (the watcher settles such a change in 0.1 s).
pub fn replace_file(path: &Path, contents: &str) {
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// The upstream key file `openai-key` in `dir`, with these permission bits.
pub fn write_key(dir: &Path, mode: u32) -> PathBuf {
    let path = dir.join("openai-key");
    write_with_mode(&path, &format!("{UPSTREAM_KEY}\n"), mode);
    path
}

/// Writes `contents` to `path`, then gives it these permission bits (0o600 for a secret).
pub fn write_with_mode(path: &Path, contents: &str, mode: u32) {
    std::fs::write(path, contents).unwrap();
    set_mode(path, mode);
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A directory for a tokens-mode proxy: the upstream key file (0600) and `tokens` as
/// tokens.toml.
pub fn tokens_dir(tokens: &str) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_key(dir.path(), 0o600);
    std::fs::write(dir.path().join("tokens.toml"), tokens).unwrap();
    dir
}
