//! Credentials from `TICKSTREAM_USERS` and the per-IP failed-AUTH limiter.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

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
}

/// The accepted user names and their passwords.
#[derive(Clone)]
pub struct Credentials {
    users: HashMap<String, Vec<u8>>,
}

impl std::fmt::Debug for Credentials {
    // Never print passwords, not even in a debug dump of the config.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Credentials {
    /// Parses `user:password[,user:password...]`. A password may contain ':'
    /// (the first one separates), but not ','.
    pub fn parse(spec: &str) -> Result<Credentials, CredentialsError> {
        let mut users = HashMap::new();
        for (index, entry) in spec.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let (user, password) = entry
                .split_once(':')
                .ok_or(CredentialsError::MissingColon { index })?;
            if user.is_empty() {
                return Err(CredentialsError::EmptyUser { index });
            }
            if users
                .insert(user.to_owned(), password.as_bytes().to_vec())
                .is_some()
            {
                return Err(CredentialsError::Duplicate(user.to_owned()));
            }
        }
        if users.is_empty() {
            return Err(CredentialsError::Empty);
        }
        Ok(Credentials { users })
    }

    /// True when `username` exists and `password` matches, compared in
    /// constant time. An unknown user is compared against a dummy secret, so
    /// the timing does not tell which user names exist.
    pub fn verify(&self, username: &str, password: &str) -> bool {
        const DUMMY: &[u8] = b"tickstream-no-such-user-dummy-password";
        let (secret, known) = match self.users.get(username) {
            Some(secret) => (secret.as_slice(), true),
            None => (DUMMY, false),
        };
        let equal: bool = secret.ct_eq(password.as_bytes()).into();
        equal && known
    }
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
