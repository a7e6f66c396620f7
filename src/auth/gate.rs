//! The broker's side of authentication and authorization: the loaded password and ACL files,
//! swapped whole on SIGHUP, and the CONNECT-time decision. Password hashes are slow on
//! purpose, so they are checked on the blocking pool, a few at a time: a burst of CONNECTs
//! costs those connections time, never the routing threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::Semaphore;

use super::acl::{AclFile, ClientAcl};
use super::password::PasswordFile;
use crate::config::AuthConfig;

/// Password checks running at once; more CONNECTs wait their turn.
const CONCURRENT_HASHES: usize = 2;

/// An ACL generation as a delivery carries it (`Delivery::acl_epoch`): its low 32 bits,
/// never 0 (0 = not checked).
pub fn epoch_tag(generation: u64) -> u32 {
    (generation as u32).max(1)
}

/// What CONNECT's credentials earned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted; `verified` when the username was proven (password or certificate), so it
    /// may select ACL rules. An unverified client is anonymous to the ACL.
    Allowed {
        /// The username was checked.
        verified: bool,
    },
    /// Unknown user or wrong password (3.1.1 CONNACK 4, v5 0x86).
    BadCredentials,
    /// No acceptable identity: anonymous where it is not allowed, or no certificate name
    /// (3.1.1 CONNACK 5, v5 0x87).
    NotAuthorized,
}

/// Password file and ACL as last loaded. Owned by the broker; readers clone an `Arc` under a
/// short read lock, so a reload never waits for a connection and vice versa.
#[derive(Debug)]
pub struct Gate {
    passwords: RwLock<Option<Arc<PasswordFile>>>,
    acl: RwLock<Option<Arc<AclFile>>>,
    /// Bumped by every load of the files (from 1), so a connection knows to recompute its
    /// rules; shared with the session queues holding rules of this gate, which use them while
    /// routing only as long as the generation they were made in is current.
    acl_generation: Arc<AtomicU64>,
    /// Bounds the password hashes running at once; a permit travels with its hash onto the
    /// blocking pool, so a CONNECT that gives up waiting cannot leave a hash unaccounted.
    hashing: Arc<Semaphore>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            passwords: RwLock::new(None),
            acl: RwLock::new(None),
            acl_generation: Arc::new(AtomicU64::new(1)),
            hashing: Arc::new(Semaphore::new(CONCURRENT_HASHES)),
        }
    }
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn write<T>(lock: &RwLock<T>, value: T) {
    *lock.write().unwrap_or_else(|e| e.into_inner()) = value;
}

impl Gate {
    /// Load the files `config` names; an error names the file and line.
    pub fn load(config: &AuthConfig) -> Result<Gate, String> {
        let gate = Gate::default();
        gate.reload(config)?;
        Ok(gate)
    }

    /// A gate that lets nobody in: what a broker gets when its files could not be read at
    /// build time (failing closed).
    pub fn deny_all() -> Gate {
        let gate = Gate::default();
        write(&gate.passwords, Some(Arc::new(PasswordFile::default())));
        write(&gate.acl, Some(Arc::new(AclFile::default())));
        gate
    }

    /// Read the files again. Either both load and replace the running ones, or neither
    /// changes and the error is returned. A file no longer configured is dropped.
    pub fn reload(&self, config: &AuthConfig) -> Result<(), String> {
        let passwords = match &config.password_file {
            Some(p) => Some(Arc::new(
                PasswordFile::load(p).map_err(|e| format!("{}: {e}", p.display()))?,
            )),
            None => None,
        };
        let acl = match &config.acl_file {
            Some(p) => Some(Arc::new(
                AclFile::load(p).map_err(|e| format!("{}: {e}", p.display()))?,
            )),
            None => None,
        };
        write(&self.passwords, passwords);
        write(&self.acl, acl);
        self.acl_generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Decide CONNECT's credentials. `username` is the CONNECT's, or the certificate's CN
    /// when `identity` says the listener takes it from there (its password is then not
    /// checked: the verified certificate is the credential).
    pub async fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&Bytes>,
        identity: bool,
        allow_anonymous: bool,
    ) -> Verdict {
        if identity {
            return match username {
                Some(_) => Verdict::Allowed { verified: true },
                None => Verdict::NotAuthorized,
            };
        }
        let passwords = read(&self.passwords);
        let (Some(user), Some(passwords)) = (username, passwords) else {
            // Without a password file a username proves nothing: the client counts as
            // anonymous (and the caller must not use the name for the ACL either).
            return if allow_anonymous {
                Verdict::Allowed { verified: false }
            } else {
                Verdict::NotAuthorized
            };
        };
        let Some(password) = password.cloned() else {
            return Verdict::BadCredentials;
        };
        if !passwords.contains(user) {
            // No hash to check: answered at once, without a place in the hashing queue.
            return Verdict::BadCredentials;
        }
        let Ok(permit) = self.hashing.clone().acquire_owned().await else {
            return Verdict::NotAuthorized;
        };
        let user = user.to_string();
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            passwords.verify(&user, &password)
        })
        .await;
        if ok.unwrap_or(false) {
            Verdict::Allowed { verified: true }
        } else {
            Verdict::BadCredentials
        }
    }

    /// The counter behind [`Gate::acl_generation`], for a session queue to compare with.
    pub fn acl_generation_counter(&self) -> Arc<AtomicU64> {
        self.acl_generation.clone()
    }

    /// The ACL generation now; a connection whose rules are older recomputes them.
    pub fn acl_generation(&self) -> u64 {
        self.acl_generation.load(Ordering::Acquire)
    }

    /// One client's rules, or `None` when no ACL file is configured (everything allowed).
    pub fn client_acl(&self, username: Option<&str>, client_id: &str) -> Option<Arc<ClientAcl>> {
        read(&self.acl).map(|acl| Arc::new(acl.for_client(username, client_id)))
    }
}
