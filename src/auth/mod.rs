//! Authentication and authorization from Mosquitto-compatible files, so existing
//! `password_file` and `acl_file` setups carry over unchanged.
//!
//! - [`password`]: the `username:hash` password file (`$7$` PBKDF2-SHA512 and `$6$` SHA-512
//!   hashes), verification, and the edits behind `tether passwd`.
//! - [`acl`]: the ACL file (`user`, `topic`, `pattern` lines) and per-client decisions on
//!   publish, delivery and subscribe.
//!
//! Everything here is synchronous and knows nothing of connections or sessions: the broker
//! loads the files, and asks these types yes-or-no questions.

pub mod acl;
mod base64;
pub mod password;
