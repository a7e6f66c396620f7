//! Authentication and authorization from Mosquitto-compatible files, so existing
//! `password_file` and `acl_file` setups carry over unchanged.
//!
//! - [`password`]: the `username:hash` password file (`$7$` PBKDF2-SHA512 and `$6$` SHA-512
//!   hashes), verification, and the edits behind `tether passwd`.
//! - [`gate`]: the loaded files as the broker holds them, reloaded on SIGHUP, and the
//!   CONNECT decision (hashes checked off the async threads).
//! - [`acl`]: the ACL file (`user`, `topic`, `pattern` lines) and per-client decisions on
//!   publish, delivery and subscribe.
//!
//! `password` and `acl` are synchronous and know nothing of connections or sessions: `gate`
//! loads the files, and connections ask it yes-or-no questions.

pub mod acl;
mod base64;
mod filters;
pub mod gate;
pub mod password;
