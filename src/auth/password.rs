//! Mosquitto's password file: one `username:hash` line per user.
//!
//! Two hash formats are read, so files made by either generation of `mosquitto_passwd` work:
//!
//! - `$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512, the Mosquitto 2.x default (it writes
//!   101 iterations, a 12-byte salt and a 64-byte hash).
//! - `$6$<salt>$<hash>`: one round of SHA-512 over the password bytes followed by the salt
//!   bytes, the Mosquitto 1.x format.
//!
//! Salts and hashes are standard base64. Blank lines and lines starting with `#` are ignored;
//! the username is everything before the first `:`, as Mosquitto splits it. Error messages
//! carry line numbers but never a hash or a password, since they end up in logs.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::num::NonZeroU32;
use std::path::Path;

use ring::rand::SecureRandom;

use super::base64;

/// Iterations for hashes we write: `mosquitto_passwd` uses 101, far too few for a KDF whose
/// whole point is to be slow for an attacker holding the file. Mosquitto reads the count from
/// each line, so files we write still work there.
pub const DEFAULT_ITERATIONS: u32 = 100_000;

/// Salt length of new hashes, the same as `mosquitto_passwd`'s.
const SALT_LEN: usize = 12;

/// Both formats store a full SHA-512-sized hash.
const HASH_LEN: usize = 64;

/// One user's stored hash.
#[derive(Clone)]
enum Hash {
    Pbkdf2Sha512 {
        iterations: NonZeroU32,
        salt: Vec<u8>,
        hash: [u8; HASH_LEN],
    },
    Sha512 {
        salt: Vec<u8>,
        hash: [u8; HASH_LEN],
    },
}

impl Hash {
    fn parse(text: &str) -> Result<Hash, String> {
        if let Some(rest) = text.strip_prefix("$7$") {
            let mut parts = rest.split('$');
            let (Some(iterations), Some(salt), Some(hash), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err("malformed $7$ hash (expected $7$iterations$salt$hash)".into());
            };
            let iterations = iterations
                .parse::<u32>()
                .ok()
                .and_then(NonZeroU32::new)
                .ok_or("invalid iteration count in $7$ hash")?;
            Ok(Hash::Pbkdf2Sha512 {
                iterations,
                salt: decode_salt(salt)?,
                hash: decode_hash(hash)?,
            })
        } else if let Some(rest) = text.strip_prefix("$6$") {
            let mut parts = rest.split('$');
            let (Some(salt), Some(hash), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err("malformed $6$ hash (expected $6$salt$hash)".into());
            };
            Ok(Hash::Sha512 {
                salt: decode_salt(salt)?,
                hash: decode_hash(hash)?,
            })
        } else {
            Err("unsupported password hash format (expected $7$ or $6$)".into())
        }
    }

    fn verify(&self, password: &[u8]) -> bool {
        let mut computed = [0u8; HASH_LEN];
        let stored = match self {
            Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                ring::pbkdf2::derive(
                    ring::pbkdf2::PBKDF2_HMAC_SHA512,
                    *iterations,
                    salt,
                    password,
                    &mut computed,
                );
                hash
            }
            Hash::Sha512 { salt, hash } => {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
                ctx.update(password);
                ctx.update(salt);
                computed.copy_from_slice(ctx.finish().as_ref());
                hash
            }
        };
        constant_time_eq(&computed, stored)
    }
}

fn decode_salt(text: &str) -> Result<Vec<u8>, String> {
    match base64::decode(text) {
        Some(salt) if !salt.is_empty() => Ok(salt),
        Some(_) => Err("empty salt".into()),
        None => Err("salt is not valid base64".into()),
    }
}

fn decode_hash(text: &str) -> Result<[u8; HASH_LEN], String> {
    let bytes = base64::decode(text).ok_or("hash is not valid base64")?;
    <[u8; HASH_LEN]>::try_from(bytes.as_slice())
        .map_err(|_| format!("hash is {} bytes, expected {HASH_LEN}", bytes.len()))
}

/// Folds every byte difference together so the time taken does not depend on where the first
/// mismatch is: an early exit would let an attacker find a matching hash prefix by timing.
fn constant_time_eq(a: &[u8; HASH_LEN], b: &[u8; HASH_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold back into a short-circuit compare.
    std::hint::black_box(diff) == 0
}

/// A loaded password file: each user's stored hash.
#[derive(Clone, Default)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
}

// Hand-written so the hashes never reach a log through `{:?}`.
impl fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users.len())
            .finish()
    }
}

/// Why a password file could not be read, parsed or updated.
#[derive(Debug)]
pub struct PasswordFileError {
    /// The 1-based line at fault; 0 when the problem is not one line (I/O, a missing user).
    pub line: usize,
    /// What is wrong, without any hash or password in it.
    pub message: String,
}

impl PasswordFileError {
    fn new(line: usize, message: impl Into<String>) -> Self {
        PasswordFileError {
            line,
            message: message.into(),
        }
    }

    fn io(action: &str, path: &Path, err: &io::Error) -> Self {
        Self::new(0, format!("cannot {action} {}: {err}", path.display()))
    }
}

impl fmt::Display for PasswordFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "password file: {}", self.message)
        } else {
            write!(f, "password file line {}: {}", self.line, self.message)
        }
    }
}

impl std::error::Error for PasswordFileError {}

/// A line that holds an entry (not blank, not a comment), as `(username, hash text)`.
///
/// `None` for lines the parser skips; `Some(Err)` for a non-comment line without a `:`.
fn entry(line: &str) -> Option<Result<(&str, &str), &'static str>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    Some(line.split_once(':').ok_or("expected username:hash"))
}

impl PasswordFile {
    /// Parses the text of a password file. A user listed twice is an error, since which of the
    /// two hashes counts would otherwise be a guess.
    pub fn parse(text: &str) -> Result<PasswordFile, PasswordFileError> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let Some(parsed) = entry(line) else {
                continue;
            };
            let (username, hash) = parsed.map_err(|m| PasswordFileError::new(number, m))?;
            if username.is_empty() {
                return Err(PasswordFileError::new(number, "empty username"));
            }
            let hash = Hash::parse(hash).map_err(|m| PasswordFileError::new(number, m))?;
            if users.insert(username.to_owned(), hash).is_some() {
                return Err(PasswordFileError::new(
                    number,
                    format!("user {username:?} is listed more than once"),
                ));
            }
        }
        Ok(PasswordFile { users })
    }

    /// Reads and parses the password file at `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, PasswordFileError> {
        let text = fs::read_to_string(path).map_err(|e| PasswordFileError::io("read", path, &e))?;
        Self::parse(&text)
    }

    /// The number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when the file lists no users (so nobody can log in with a password).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// True iff the user exists and the password matches; hashes are compared in constant time
    /// (xor-fold, no early exit).
    ///
    /// A `$7$` check costs the line's iteration count of HMAC-SHA512 rounds on the calling
    /// thread, so the broker should call this off its I/O threads. An unknown user returns at
    /// once, which reveals by timing that the name is not in the file.
    pub fn verify(&self, username: &str, password: &[u8]) -> bool {
        self.users
            .get(username)
            .is_some_and(|hash| hash.verify(password))
    }

    /// Whether the file has a line for `username` (cheap: no hash is computed).
    pub fn contains(&self, username: &str) -> bool {
        self.users.contains_key(username)
    }
}

/// A new `$7$` entry's hash string with a fresh random 12-byte salt.
///
/// Fails for zero iterations or when the system random source does.
pub fn hash_password(password: &[u8], iterations: u32) -> Result<String, PasswordFileError> {
    let iterations = NonZeroU32::new(iterations)
        .ok_or_else(|| PasswordFileError::new(0, "iteration count must be at least 1"))?;
    let mut salt = [0u8; SALT_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| PasswordFileError::new(0, "system random source failed"))?;
    let mut hash = [0u8; HASH_LEN];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        iterations,
        &salt,
        password,
        &mut hash,
    );
    Ok(format!(
        "$7${iterations}${}${}",
        base64::encode(&salt),
        base64::encode(&hash)
    ))
}

/// Usernames `update_file` can write so that `PasswordFile::parse` reads them back unchanged.
fn check_username(username: &str) -> Result<(), PasswordFileError> {
    let problem = if username.is_empty() {
        "empty username"
    } else if username.contains(':') {
        "username must not contain ':'"
    } else if username.chars().any(char::is_control) {
        // A newline would start a new line of the file.
        "username must not contain control characters"
    } else if username.trim() != username {
        // Lines are trimmed when read, so such a name could never log in.
        "username must not start or end with whitespace"
    } else if username.starts_with('#') {
        // It would read back as a comment.
        "username must not start with '#'"
    } else {
        return Ok(());
    };
    Err(PasswordFileError::new(0, problem))
}

/// For `tether passwd FILE USER`: add or replace (`Some(password)`) or delete (`None`) USER's
/// line, keeping every other line (comments too) as it was; create the file if missing (only
/// when adding); write atomically (temp file in the same dir + rename), file mode 0600 on unix.
///
/// Returns whether the user existed before. Deleting a missing user is an error, and so is a
/// username the file cannot hold (empty, containing `:` or a control character, starting with
/// `#`, or with whitespace at either end). Other lines are not validated, so a file with a bad
/// line elsewhere can still be edited. If the user is listed more than once, the first line is
/// replaced and the others are removed.
pub fn update_file(
    path: &Path,
    username: &str,
    password: Option<&[u8]>,
    iterations: u32,
) -> Result<bool, PasswordFileError> {
    check_username(username)?;
    let old = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound && password.is_some() => String::new(),
        Err(e) => return Err(PasswordFileError::io("read", path, &e)),
    };
    // Hash before touching anything, so a failure leaves the file as it was.
    let new_line = match password {
        Some(password) => Some(format!(
            "{username}:{}",
            hash_password(password, iterations)?
        )),
        None => None,
    };

    let mut out = String::with_capacity(old.len() + 200);
    let mut existed = false;
    // split_inclusive keeps each line's own terminator, so CRLF files stay CRLF.
    for raw in old.split_inclusive('\n') {
        let is_user = matches!(entry(raw), Some(Ok((name, _))) if name == username);
        if !is_user {
            out.push_str(raw);
            continue;
        }
        if !existed {
            if let Some(line) = &new_line {
                let ending = &raw[raw.trim_end_matches(['\r', '\n']).len()..];
                out.push_str(line);
                out.push_str(if ending.is_empty() { "\n" } else { ending });
            }
        }
        existed = true;
    }
    match (&new_line, existed) {
        (None, false) => {
            return Err(PasswordFileError::new(
                0,
                format!("user {username:?} is not in {}", path.display()),
            ))
        }
        (Some(line), false) => {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(line);
            out.push('\n');
        }
        _ => {}
    }
    write_atomically(path, out.as_bytes())?;
    Ok(existed)
}

/// Writes `contents` to a new file beside `path` and renames it over `path`, so a reader (or a
/// crash) sees either the old file or the new one, never half of one.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), PasswordFileError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| PasswordFileError::new(0, format!("{} is not a file", path.display())))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".tmp.{}", std::process::id()));
    let temp = dir.join(temp_name);

    let mut options = fs::OpenOptions::new();
    // create_new: never write through a file (or symlink) someone else put at the temp name.
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    // An existing file keeps its mode and, where we may set it, its owner and group: a file
    // an operator made readable to the service's group must stay readable after an edit.
    let existing = fs::metadata(path).ok();
    let result = options
        .open(&temp)
        .and_then(|mut file| {
            #[cfg(unix)]
            if let Some(meta) = &existing {
                use std::os::unix::fs::MetadataExt;
                file.set_permissions(meta.permissions())?;
                let _ = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()));
            }
            file.write_all(contents)?;
            // The data must be on disk before the rename makes it the file.
            file.sync_all()
        })
        .and_then(|()| fs::rename(&temp, path));
    if let Err(e) = result {
        // Best effort: the error being reported is the write's, not the clean-up's.
        let _ = fs::remove_file(&temp);
        return Err(PasswordFileError::io("write", path, &e));
    }
    // Makes the rename itself durable; failing here loses nothing already written.
    #[cfg(unix)]
    if let Ok(dir) = fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Made by Debian's Mosquitto 2.x: `mosquitto_passwd -b -c FILE alice s3cret`.
    const ALICE_7: &str = "alice:$7$101$GsJWpQZqXvnnfgtw$wf8VXGyZwbvLHfyb/7+ugY/H5mxO2tLLzZral5FjecejkJb48zY/fvQeyxcJLAkKTmEnuwK4LCAwOAyHY1lqOA==";

    /// Password `hunter2`, salt bytes 1..=12, computed with Python as
    /// `base64.b64encode(hashlib.sha512(b"hunter2" + bytes(range(1, 13))).digest())`.
    const BOB_6: &str = "bob:$6$AQIDBAUGBwgJCgsM$BvAI+Qf6pQOLRl808d6QZTT3a6B0xO5zIcHD3JzY0IlwG27yGPwEz2wOVlVnzMCgfQVblzctfy3CVaRYU+etmQ==";

    /// Made by `mosquitto_passwd -H sha512 -b -c FILE carol hunter2` (random salt).
    const CAROL_6: &str = "carol:$6$6ihrIQ9bTP8oX6AR$L2oSQe+OEEAdjd/xU2m45yiwy/Sc62Vv5JDDxyNFWGXazK5EcYluacaXTPXpXTjc5CHx4OZ+1N2gsFPr5A1jTg==";

    #[test]
    fn verifies_mosquitto_pbkdf2_line() {
        let file = PasswordFile::parse(ALICE_7).unwrap();
        assert_eq!(file.len(), 1);
        assert!(file.verify("alice", b"s3cret"));
        assert!(!file.verify("alice", b"s3cret "));
        assert!(!file.verify("alice", b""));
        assert!(!file.verify("Alice", b"s3cret"));
        assert!(!file.verify("mallory", b"s3cret"));
    }

    #[test]
    fn verifies_sha512_lines() {
        let file = PasswordFile::parse(&format!("{BOB_6}\n{CAROL_6}\n")).unwrap();
        assert!(file.verify("bob", b"hunter2"));
        assert!(file.verify("carol", b"hunter2"));
        assert!(!file.verify("bob", b"hunter3"));
        assert!(!file.verify("carol", b"Hunter2"));
    }

    #[test]
    fn skips_comments_blanks_and_trailing_whitespace() {
        let text = format!("# users\n\n   \n{ALICE_7}  \r\n  # indented comment\r\n{BOB_6}\r\n");
        let file = PasswordFile::parse(&text).unwrap();
        assert_eq!(file.len(), 2);
        assert!(file.verify("alice", b"s3cret"));
        assert!(file.verify("bob", b"hunter2"));
        assert!(PasswordFile::parse("# nothing\n").unwrap().is_empty());
    }

    #[test]
    fn username_ends_at_first_colon() {
        // "a:b" is not a valid hash, so "a" with hash "b:$7$..." must be rejected...
        let err = PasswordFile::parse(&format!("a:{ALICE_7}")).unwrap_err();
        assert_eq!(err.line, 1);
        // ...and a $6$ line's own colons never reach the username.
        let file = PasswordFile::parse(BOB_6).unwrap();
        assert!(file.verify("bob", b"hunter2"));
    }

    #[test]
    fn bad_lines_report_their_line_number_and_no_secrets() {
        let good = format!("# c\n{ALICE_7}\n\n");
        let cases = [
            "nocolon".to_owned(),
            ":$6$AQIDBAUGBwgJCgsM$AAAA".to_owned(),
            "dave:plaintext".to_owned(),
            "dave:$5$abc$def".to_owned(),
            "dave:$7$0$GsJWpQZqXvnnfgtw$AAAA".to_owned(),
            "dave:$7$x$GsJWpQZqXvnnfgtw$AAAA".to_owned(),
            "dave:$7$101$GsJWpQZqXvnnfgtw".to_owned(),
            "dave:$7$101$!!!!$AAAA".to_owned(),
            "dave:$6$AQIDBAUGBwgJCgsM$QUJD".to_owned(),
            "dave:$6$$QUJD".to_owned(),
            BOB_6.replace("bob", "alice"),
        ];
        for bad in cases {
            let err = PasswordFile::parse(&format!("{good}{bad}\n")).unwrap_err();
            assert_eq!(err.line, 4, "{bad}");
            let shown = err.to_string();
            assert!(shown.starts_with("password file line 4: "), "{shown}");
            assert!(!shown.contains("GsJWpQZqXvnnfgtw"), "{shown}");
            assert!(!shown.contains("plaintext"), "{shown}");
            assert!(!shown.contains("QUJD"), "{shown}");
        }
    }

    #[test]
    fn hash_password_round_trip() {
        let hash = hash_password(b"correct horse", 1000).unwrap();
        assert!(hash.starts_with("$7$1000$"), "{hash}");
        let file = PasswordFile::parse(&format!("erin:{hash}")).unwrap();
        assert!(file.verify("erin", b"correct horse"));
        assert!(!file.verify("erin", b"correct horsE"));
        // Fresh salt each time.
        assert_ne!(hash, hash_password(b"correct horse", 1000).unwrap());
        assert!(hash_password(b"x", 0).is_err());
    }

    #[test]
    fn debug_shows_no_hashes() {
        let file = PasswordFile::parse(ALICE_7).unwrap();
        assert_eq!(format!("{file:?}"), "PasswordFile { users: 1 }");
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir()
                .join(format!("tether-auth-{tag}-{}-{nanos}", std::process::id()));
            fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn update_file_adds_changes_and_deletes() {
        let dir = TempDir::new("update");
        let path = dir.0.join("passwd");

        // Deleting from a missing file fails and creates nothing.
        assert!(update_file(&path, "alice", None, 1000).is_err());
        assert!(!path.exists());

        assert!(!update_file(&path, "frank", Some(b"one"), 1000).unwrap());
        let original = format!("# header\n{}\n\n# about bob\n{BOB_6}\r\n# trailer", {
            fs::read_to_string(&path).unwrap().trim_end()
        });
        fs::write(&path, &original).unwrap();

        // Change frank: every other line, CRLF and the unterminated last line stay as they were.
        assert!(update_file(&path, "frank", Some(b"two"), 1000).unwrap());
        let text = fs::read_to_string(&path).unwrap();
        let file = PasswordFile::parse(&text).unwrap();
        assert!(file.verify("frank", b"two"));
        assert!(!file.verify("frank", b"one"));
        assert!(file.verify("bob", b"hunter2"));
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines[0], "# header");
        assert!(lines[1].starts_with("frank:$7$1000$"));
        assert_eq!(
            &lines[2..],
            ["", "# about bob", &format!("{BOB_6}\r"), "# trailer"]
        );

        // Add: appended after the unterminated last line, on a line of its own.
        assert!(!update_file(&path, "gina", Some(b"three"), 1000).unwrap());
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\n# trailer\ngina:$7$1000$"), "{text}");
        assert!(text.ends_with('\n'));
        assert_eq!(PasswordFile::parse(&text).unwrap().len(), 3);

        // Delete frank: only his line goes.
        assert!(update_file(&path, "frank", None, 1000).unwrap());
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("frank"));
        assert!(text.starts_with(&format!("# header\n\n# about bob\n{BOB_6}\r\n# trailer\n")));
        let file = PasswordFile::parse(&text).unwrap();
        assert_eq!(file.len(), 2);
        assert!(file.verify("gina", b"three"));

        // Deleting again fails and leaves the file alone.
        assert!(update_file(&path, "frank", None, 1000).is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), text);

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temp files left behind.
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1);
    }

    #[test]
    fn update_file_refuses_bad_usernames() {
        let dir = TempDir::new("names");
        let path = dir.0.join("passwd");
        for bad in ["", "a:b", "a\nb", " a", "a ", "#a"] {
            assert!(
                update_file(&path, bad, Some(b"pw"), 1000).is_err(),
                "{bad:?}"
            );
        }
        assert!(!path.exists());
    }
}
