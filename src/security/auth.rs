//! Client tokens and their roles (`--auth-file`).
//!
//! The file holds one `<token> <role>` per line (`#` starts a comment; blank
//! lines are skipped). A token may be written as `sha256:<64 hex digits>`,
//! its SHA-256 digest, so the file need not hold the secret itself. Only
//! digests are kept in memory; a presented token is hashed and compared with
//! every entry in constant time, so neither the comparison's time nor an
//! early exit tells how much of a guess was right. Tokens are never logged
//! or shown in errors: a problem in the file names its line, not its token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use subtle::ConstantTimeEq;

use super::reload::Reloadable;

/// What a token may do; each role may do what the roles before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Get, the smart client's replica reads, Cluster.Status.
    Read,
    /// Also Put and Delete.
    ReadWrite,
    /// Also membership changes (abort, and the changes to come).
    Admin,
}

impl Role {
    /// The name the auth file uses.
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::ReadWrite => "readwrite",
            Role::Admin => "admin",
        }
    }

    fn parse(name: &str) -> Option<Role> {
        [Role::Read, Role::ReadWrite, Role::Admin]
            .into_iter()
            .find(|role| role.name() == name)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// SHA-256 of a token.
type Digest = [u8; 32];

fn digest(token: &[u8]) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token).as_ref());
    out
}

/// The tokens of one auth file, as digests with their roles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    entries: Vec<(Digest, Role)>,
}

impl Tokens {
    /// Parses an auth file's text; an error names the line (never the token).
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut entries: Vec<(Digest, Role)> = Vec::new();
        // A byte-order mark (some editors write one) is not part of a token.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [token, role] = fields[..] else {
                return Err(format!(
                    "line {number}: expected `<token> <role>` (two fields), found {}",
                    fields.len()
                ));
            };
            // Not echoed: a line written role first would show its token.
            let role = Role::parse(role).ok_or_else(|| {
                format!(
                    "line {number}: the second field must be a role: read, readwrite or admin \
                     (`<token> <role>`)"
                )
            })?;
            let digest = match token.strip_prefix("sha256:") {
                Some(hex) => parse_hex_digest(hex).ok_or_else(|| {
                    format!("line {number}: sha256: must be followed by 64 hex digits")
                })?,
                None => digest(token.as_bytes()),
            };
            if let Some((_, other)) = entries.iter().find(|(d, _)| *d == digest) {
                if *other != role {
                    return Err(format!(
                        "line {number}: this token is also listed earlier with role {other}; give each token one role"
                    ));
                }
                continue;
            }
            entries.push((digest, role));
        }
        Ok(Tokens { entries })
    }

    /// How many tokens the file lists.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The role of `token`, if it is listed. Takes the same time whichever
    /// entry (if any) matches.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        let presented = digest(token.as_bytes());
        let mut found = None;
        for (listed, role) in &self.entries {
            if bool::from(listed.ct_eq(&presented)) {
                found = Some(*role);
            }
        }
        found
    }
}

fn parse_hex_digest(hex: &str) -> Option<Digest> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The token a request carries: `authorization: Bearer <token>`. `Err` when
/// the header is there but is not a bearer token (says what to send).
pub fn bearer_token(header: Option<&http::HeaderValue>) -> Result<Option<&str>, String> {
    let Some(value) = header else {
        return Ok(None);
    };
    let text = value.to_str().map_err(
        |_| "the authorization header is not ASCII; send `authorization: Bearer <token>`",
    )?;
    let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err("the authorization header must be `Bearer <token>`".into());
    }
    Ok(Some(token.trim()))
}

/// An auth file and the tokens of its last good load; reloaded on SIGHUP
/// and when its contents change.
pub struct AuthFile {
    path: PathBuf,
    tokens: Reloadable<Tokens, Vec<u8>>,
}

impl AuthFile {
    /// Loads `path`; an error names the file and the line.
    pub fn load(path: &Path) -> Result<AuthFile, String> {
        let bytes = read_auth_file(path)?;
        let tokens = parse_auth_bytes(path, &bytes)?;
        Ok(AuthFile {
            path: path.to_path_buf(),
            tokens: Reloadable::new(tokens, bytes),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tokens of the last good load.
    pub fn tokens(&self) -> Arc<Tokens> {
        self.tokens.current()
    }

    /// Rereads the file; swaps in its tokens if it changed and parses.
    /// `Ok(true)`: swapped; an error (reported once) keeps the tokens.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let bytes = read_auth_file(&self.path)?;
        self.tokens
            .offer(bytes, |bytes| parse_auth_bytes(&self.path, bytes))
    }
}

fn read_auth_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "cannot read the auth file (--auth-file) {}: {e}",
            path.display()
        )
    })
}

fn parse_auth_bytes(path: &Path, bytes: &[u8]) -> Result<Tokens, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| format!("the auth file {} is not UTF-8 text", path.display()))?;
    let tokens = Tokens::parse(text).map_err(|e| format!("{}: {e}", path.display()))?;
    if tokens.is_empty() {
        return Err(format!(
            "the auth file {} lists no token: every client would be refused (one `<token> <role>` per line)",
            path.display()
        ));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_their_roles_and_digests_stand_for_tokens() {
        let hex: String = digest(b"hashed-secret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let text = format!(
            "# comment\n\nreader-secret read\nwriter-secret readwrite # trailing comment\nsha256:{hex} admin\n"
        );
        let tokens = Tokens::parse(&text).expect("parses");
        assert_eq!(tokens.len(), 3);
        assert_eq!(tokens.role_of("reader-secret"), Some(Role::Read));
        assert_eq!(tokens.role_of("writer-secret"), Some(Role::ReadWrite));
        assert_eq!(tokens.role_of("hashed-secret"), Some(Role::Admin));
        assert_eq!(tokens.role_of(&format!("sha256:{hex}")), None);
        assert_eq!(tokens.role_of("reader-secreT"), None);
        let with_bom = Tokens::parse("\u{feff}bom-token read\r\n").expect("parses");
        assert_eq!(with_bom.role_of("bom-token"), Some(Role::Read));
        assert_eq!(tokens.role_of(""), None);
        assert!(Role::Read < Role::ReadWrite && Role::ReadWrite < Role::Admin);
    }

    #[test]
    fn a_bad_line_is_named_by_number_without_its_token() {
        for (text, expect) in [
            ("ok-token read\nsecret-one\n", "line 2: expected"),
            (
                "secret-two superuser\n",
                "line 1: the second field must be a role",
            ),
            (
                "admin secret-four\n",
                "line 1: the second field must be a role",
            ),
            ("sha256:abc read\n", "line 1: sha256:"),
            (
                "secret-three read\nsecret-three admin\n",
                "line 2: this token",
            ),
            ("a b c\n", "line 1: expected"),
        ] {
            let error = Tokens::parse(text).expect_err(text);
            assert!(error.starts_with(expect), "{text:?}: {error}");
            assert!(!error.contains("secret"), "a token leaked: {error}");
        }
    }

    #[test]
    fn only_bearer_authorization_is_a_token() {
        let value = |s: &'static str| http::HeaderValue::from_static(s);
        assert_eq!(bearer_token(None), Ok(None));
        assert_eq!(bearer_token(Some(&value("Bearer abc"))), Ok(Some("abc")));
        assert_eq!(bearer_token(Some(&value("bearer  abc "))), Ok(Some("abc")));
        assert!(bearer_token(Some(&value("Basic dXNlcg=="))).is_err());
        assert!(bearer_token(Some(&value("Bearer"))).is_err());
        let binary = http::HeaderValue::from_bytes(b"Bearer \xff").expect("header");
        assert!(bearer_token(Some(&binary)).is_err());
    }

    #[test]
    fn an_auth_file_reloads_when_it_changes_and_keeps_the_old_tokens_on_a_bad_edit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, "first-token read\n").expect("write");
        let file = AuthFile::load(&path).expect("loads");
        assert_eq!(file.reload_if_changed(), Ok(false));
        std::fs::write(&path, "second-token admin\n").expect("write");
        assert_eq!(file.reload_if_changed(), Ok(true));
        assert_eq!(file.tokens().role_of("first-token"), None);
        assert_eq!(file.tokens().role_of("second-token"), Some(Role::Admin));
        std::fs::write(&path, "half-written\n").expect("write");
        assert!(file.reload_if_changed().is_err());
        // Reported once while the file stays the same.
        assert_eq!(file.reload_if_changed(), Ok(false));
        assert_eq!(file.tokens().role_of("second-token"), Some(Role::Admin));
        std::fs::write(&path, "# nobody\n").expect("write");
        assert!(
            file.reload_if_changed()
                .expect_err("empty")
                .contains("lists no token")
        );
    }
}
