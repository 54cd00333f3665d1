//! Credentials from `TICKSTREAM_USERS` and the per-IP failed-AUTH limiter.
//!
//! # `TICKSTREAM_USERS`
//!
//! `user:secret[,user:secret...]`, where a secret is either a plaintext
//! password or an argon2id PHC string (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`,
//! as `tickstream hash-password` prints it). A PHC string has commas of its
//! own, so the rule is: the value is split at every `,`; a piece that has no
//! `:` and follows an entry whose secret is a PHC string continues that
//! string (PHC strings never contain `:`, and every real entry has one).
//! User names cannot contain `:` or `,`; plaintext passwords cannot contain
//! `,` and must not begin with `$argon2`.
//!
//! # Why verification is split
//!
//! Checking an argon2id hash costs tens of milliseconds of CPU and 19 MiB by
//! design. [`Credentials::verify`] stays synchronous, but when
//! [`Credentials::is_slow`] the session hands the attempt back to the server,
//! which runs the check on tokio's blocking pool, a bounded number at a time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use parking_lot::Mutex;
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::time::Instant;

/// The environment variable holding `user:password[,user:password...]`.
pub const USERS_ENV: &str = "TICKSTREAM_USERS";

/// A `TICKSTREAM_USERS` value that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CredentialsError {
    #[error("{USERS_ENV} is empty: set it to user:password[,user:password...]")]
    Empty,
    #[error("{USERS_ENV} entry {index} has no ':' between user and password")]
    MissingColon { index: usize },
    #[error("{USERS_ENV} entry {index} has an empty user name")]
    EmptyUser { index: usize },
    #[error("{USERS_ENV} names user {0:?} twice")]
    Duplicate(String),
    #[error("{USERS_ENV} entry {index} is not an argon2id PHC hash: {reason}")]
    BadHash { index: usize, reason: String },
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// The accepted user names and their secrets.
#[derive(Clone)]
pub struct Credentials {
    users: HashMap<String, Secret>,
    /// True when any secret is a hash: then every check, unknown users
    /// included, costs a hash verification, so timing does not tell which
    /// users exist.
    slow: bool,
}

#[derive(Clone)]
enum Secret {
    Plain(Vec<u8>),
    /// A PHC string, checked to parse as argon2id.
    Argon2id(String),
}

/// The prefix that marks a secret as a PHC hash.
const PHC_PREFIX: &str = "$argon2";
const ARGON2ID_PREFIX: &str = "$argon2id$";

impl std::fmt::Debug for Credentials {
    // Never print passwords, not even in a debug dump of the config.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Credentials {
    /// Parses `TICKSTREAM_USERS` (see the module docs for the comma rule).
    pub fn parse(spec: &str) -> Result<Credentials, CredentialsError> {
        let mut users = HashMap::new();
        for (index, entry) in split_entries(spec).into_iter().enumerate() {
            let (user, secret) = entry
                .split_once(':')
                .ok_or(CredentialsError::MissingColon { index })?;
            if user.is_empty() {
                return Err(CredentialsError::EmptyUser { index });
            }
            let secret = if secret.starts_with(PHC_PREFIX) {
                check_phc(secret).map_err(|reason| CredentialsError::BadHash { index, reason })?;
                Secret::Argon2id(secret.to_owned())
            } else {
                Secret::Plain(secret.as_bytes().to_vec())
            };
            if users.insert(user.to_owned(), secret).is_some() {
                return Err(CredentialsError::Duplicate(user.to_owned()));
            }
        }
        if users.is_empty() {
            return Err(CredentialsError::Empty);
        }
        let slow = users.values().any(|s| matches!(s, Secret::Argon2id(_)));
        Ok(Credentials { users, slow })
    }

    /// True when [`Credentials::verify`] may take tens of milliseconds (some
    /// secret is a hash): run it off the async reactor.
    pub fn is_slow(&self) -> bool {
        self.slow
    }

    /// True when `username` exists and `password` matches. Plaintext secrets
    /// are compared in constant time; hashes are verified with argon2id. An
    /// unknown user is checked against a dummy secret of the same kind, so
    /// the timing does not tell which user names exist.
    pub fn verify(&self, username: &str, password: &str) -> bool {
        const DUMMY: &[u8] = b"tickstream-no-such-user-dummy-password";
        match self.users.get(username) {
            Some(Secret::Plain(secret)) => secret.ct_eq(password.as_bytes()).into(),
            Some(Secret::Argon2id(phc)) => verify_phc(phc, password),
            None if self.slow => {
                let _ = verify_phc(dummy_phc(), password);
                false
            }
            None => {
                let _: bool = DUMMY.ct_eq(password.as_bytes()).into();
                false
            }
        }
    }
}

/// An argon2id PHC string for `password` with a random salt and the argon2
/// crate's default (OWASP) parameters: m=19456 KiB, t=2, p=1.
pub fn hash_password(password: &str) -> Result<String, CredentialsError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| CredentialsError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| CredentialsError::Hash(e.to_string()))
}

/// Splits `TICKSTREAM_USERS` into `user:secret` entries, keeping the commas
/// inside PHC strings (module docs).
fn split_entries(spec: &str) -> Vec<String> {
    let mut entries: Vec<String> = Vec::new();
    for piece in spec.split(',') {
        let continues_hash = !piece.contains(':')
            && entries
                .last()
                .and_then(|e| e.split_once(':'))
                .is_some_and(|(_, secret)| secret.starts_with(PHC_PREFIX));
        match entries.last_mut() {
            Some(last) if continues_hash => {
                last.push(',');
                last.push_str(piece);
            }
            _ => entries.push(piece.to_owned()),
        }
    }
    entries
        .into_iter()
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect()
}

fn check_phc(phc: &str) -> Result<(), String> {
    if !phc.starts_with(ARGON2ID_PREFIX) {
        return Err("only argon2id is accepted".into());
    }
    let hash = PasswordHash::new(phc).map_err(|e| e.to_string())?;
    argon2::Params::try_from(&hash).map_err(|e| e.to_string())?;
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err("salt or hash missing".into());
    }
    Ok(())
}

fn verify_phc(phc: &str, password: &str) -> bool {
    // Parsed at startup by check_phc, so this parse does not fail.
    PasswordHash::new(phc)
        .map(|hash| {
            Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash of a random password, made once, to check unknown users against.
fn dummy_phc() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let random: [u8; 16] = rand::random();
        hash_password(&format!("{random:?}")).unwrap_or_default()
    })
}

/// Per-source-IP token bucket of failed AUTH attempts: `per_minute` failures
/// are allowed, refilled continuously. Once empty, AUTH from that IP is
/// refused with RATE_LIMITED before the password is checked.
pub struct AuthLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Above this many tracked addresses, full buckets are pruned.
const LIMITER_PRUNE_AT: usize = 10_000;

impl AuthLimiter {
    /// `per_minute == 0` disables the limiter.
    pub fn new(per_minute: u32) -> AuthLimiter {
        AuthLimiter {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// True when `ip` has used up its failed attempts.
    pub fn is_limited(&self, ip: IpAddr, now: Instant) -> bool {
        if self.per_minute == 0 {
            return false;
        }
        let mut buckets = self.buckets.lock();
        match buckets.get_mut(&ip) {
            Some(bucket) => {
                self.refill(bucket, now);
                bucket.tokens < 1.0
            }
            None => false,
        }
    }

    /// Counts one failed AUTH from `ip`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        if self.per_minute == 0 {
            return;
        }
        let capacity = f64::from(self.per_minute);
        let mut buckets = self.buckets.lock();
        if buckets.len() >= LIMITER_PRUNE_AT {
            buckets.retain(|_, b| {
                self.refill(b, now);
                b.tokens < capacity
            });
        }
        let bucket = buckets.entry(ip).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        self.refill(bucket, now);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let capacity = f64::from(self.per_minute);
        let elapsed = now.saturating_duration_since(bucket.updated);
        let per_second = capacity / Duration::from_secs(60).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed.as_secs_f64() * per_second).min(capacity);
        bucket.updated = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_users_and_verifies_exactly() {
        let creds = Credentials::parse("alice:secret, bob:pa:ss").unwrap();
        assert!(creds.verify("alice", "secret"));
        assert!(creds.verify("bob", "pa:ss"));
        assert!(!creds.verify("alice", "secret2"));
        assert!(!creds.verify("alice", "secre"));
        assert!(!creds.verify("carol", "secret"));
        assert!(!format!("{creds:?}").contains("secret"));
    }

    #[test]
    fn rejects_unusable_specs() {
        assert_eq!(Credentials::parse("").unwrap_err(), CredentialsError::Empty);
        assert_eq!(
            Credentials::parse("alice").unwrap_err(),
            CredentialsError::MissingColon { index: 0 }
        );
        assert_eq!(
            Credentials::parse(":pw").unwrap_err(),
            CredentialsError::EmptyUser { index: 0 }
        );
        assert!(matches!(
            Credentials::parse("a:1,a:2").unwrap_err(),
            CredentialsError::Duplicate(_)
        ));
    }

    /// A hash made once per test run (hashing costs tens of milliseconds).
    fn phc(password: &str) -> String {
        hash_password(password).unwrap()
    }

    #[test]
    fn argon2id_hashes_verify_and_keep_their_commas() {
        let hash = phc("s3cret");
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        let spec = format!("carol:{hash},alice:secret, dave:{hash}");
        let creds = Credentials::parse(&spec).unwrap();
        assert!(creds.is_slow());
        assert!(creds.verify("carol", "s3cret"));
        assert!(creds.verify("dave", "s3cret"));
        assert!(!creds.verify("carol", "secret"));
        assert!(creds.verify("alice", "secret"));
        assert!(!creds.verify("nobody", "s3cret"));
        assert!(!format!("{creds:?}").contains("argon2"));
        assert!(!Credentials::parse("alice:secret").unwrap().is_slow());
    }

    #[test]
    fn entries_split_at_commas_except_inside_a_hash() {
        let split = |s: &str| split_entries(s);
        assert_eq!(split("a:1,b:2"), ["a:1", "b:2"]);
        assert_eq!(
            split("a:$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA,b:2"),
            ["a:$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA", "b:2"]
        );
        // A piece without ':' after a plaintext entry is not glued on.
        assert_eq!(split("a:1,t=1"), ["a:1", "t=1"]);
        assert_eq!(split(" a:1 , ,b:2,"), ["a:1", "b:2"]);
    }

    #[test]
    fn malformed_or_non_argon2id_hashes_are_refused() {
        for spec in [
            "a:$argon2id$garbage",
            "a:$argon2id$v=19$nonsense",
            "a:$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            "a:$argon2id$v=19$m=0,t=0,p=0$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        ] {
            assert!(
                matches!(
                    Credentials::parse(spec),
                    Err(CredentialsError::BadHash { index: 0, .. })
                ),
                "{spec}"
            );
        }
    }

    #[test]
    fn limiter_allows_n_failures_a_minute_then_refills() {
        let limiter = AuthLimiter::new(5);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(!limiter.is_limited(ip, t0));
            limiter.record_failure(ip, t0);
        }
        assert!(limiter.is_limited(ip, t0));
        assert!(!limiter.is_limited(other, t0), "limits are per address");
        assert!(limiter.is_limited(ip, t0 + Duration::from_secs(11)));
        assert!(!limiter.is_limited(ip, t0 + Duration::from_secs(12)));
    }
}
