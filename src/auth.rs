//! Credentials from `TICKSTREAM_USERS` and the AUTH guess limiter.
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

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
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
    /// Set when any secret is a hash: a PHC string of a random password
    /// with the same parameters, that unknown names are checked against.
    /// Then every check (plaintext users, whose secrets are hashed at load,
    /// and unknown names included) costs one verification with the same
    /// parameters, so timing tells neither which names exist nor how
    /// their secrets are stored.
    dummy: Option<String>,
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
        let params = users.values().find_map(|secret| match secret {
            Secret::Argon2id(phc) => PasswordHash::new(phc)
                .ok()
                .and_then(|hash| argon2::Params::try_from(&hash).ok()),
            Secret::Plain(_) => None,
        });
        let Some(params) = params else {
            return Ok(Credentials { users, dummy: None });
        };
        for secret in users.values_mut() {
            if let Secret::Plain(plain) = secret {
                *secret = Secret::Argon2id(hash_with(plain, params.clone())?);
            }
        }
        let random: [u8; 32] = rand::random();
        let dummy = hash_with(&random, params)?;
        Ok(Credentials {
            users,
            dummy: Some(dummy),
        })
    }

    /// True when [`Credentials::verify`] may take tens of milliseconds (some
    /// secret is a hash): run it off the async reactor.
    pub fn is_slow(&self) -> bool {
        self.dummy.is_some()
    }

    /// True when `username` exists and `password` matches. Plaintext secrets
    /// are compared in constant time; hashes are verified with argon2id. An
    /// unknown user is checked against a dummy secret of the same kind, so
    /// the timing does not tell which user names exist.
    pub fn verify(&self, username: &str, password: &str) -> bool {
        const DUMMY: &[u8] = b"tickstream-no-such-user-dummy-password";
        match (self.users.get(username), &self.dummy) {
            (Some(Secret::Plain(secret)), _) => secret.ct_eq(password.as_bytes()).into(),
            (Some(Secret::Argon2id(phc)), _) => verify_phc(phc, password),
            (None, Some(dummy)) => {
                let _ = verify_phc(dummy, password);
                false
            }
            (None, None) => {
                let _: bool = DUMMY.ct_eq(password.as_bytes()).into();
                false
            }
        }
    }
}

/// An argon2id PHC string for `password` with a random salt and the argon2
/// crate's default (OWASP) parameters: m=19456 KiB, t=2, p=1.
pub fn hash_password(password: &str) -> Result<String, CredentialsError> {
    hash_with(password.as_bytes(), argon2::Params::default())
}

/// An argon2id PHC string for `password` with a random salt, `m_kib` KiB of
/// memory and `passes` passes (one lane): for tests and fuzzing, where the
/// default parameters cost too much per hash.
pub fn hash_password_with(password: &str, m_kib: u32, passes: u32) -> Result<String, CredentialsError> {
    let params =
        argon2::Params::new(m_kib, passes, 1, None).map_err(|e| CredentialsError::Hash(e.to_string()))?;
    hash_with(password.as_bytes(), params)
}

/// An argon2id PHC string for `password` with a random salt and `params`.
fn hash_with(password: &[u8], params: argon2::Params) -> Result<String, CredentialsError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| CredentialsError::Hash(e.to_string()))?;
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password, &salt)
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

/// The part of a source address that per-address limits key on: an IPv4
/// address whole, an IPv6 address cut to its first `--ipv6-prefix` bits (one
/// IPv6 host usually owns a whole /64, so keying the full address would
/// give it 2^64 budgets). IPv4-mapped IPv6 addresses count as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddrKey {
    bits: u128,
    v6: bool,
}

impl AddrKey {
    pub fn new(ip: IpAddr, ipv6_prefix: u8) -> AddrKey {
        match ip {
            IpAddr::V4(v4) => AddrKey {
                bits: u128::from(u32::from(v4)),
                v6: false,
            },
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddrKey::new(IpAddr::V4(v4), ipv6_prefix),
                None => {
                    let prefix = u32::from(ipv6_prefix.min(128));
                    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                    AddrKey {
                        bits: u128::from(v6) & mask,
                        v6: true,
                    }
                }
            },
        }
    }
}

/// The AUTH guess limiter. Two rules, both charged when a guess is taken
/// for checking (not when it has failed), so guesses carried by many
/// connections at once are counted as they arrive:
///
/// - **per source address** (an [`AddrKey`]): a GCRA of `per_minute`
///   guesses a minute with a burst of `per_minute`. Over it, AUTH is refused
///   with RATE_LIMITED before the password is checked. A successful AUTH
///   refunds its guess, so a user who types the right password is never
///   charged for it.
/// - **per user name**: failures against a name add a delay to the next
///   guesses for that name (from any address), growing with the recent
///   failures and capped, so a guesser spread over many addresses is slowed
///   too, but nobody can lock a user out: the right password still gets in
///   after the delay. Names are keyed by a salted hash into a fixed table,
///   existing or not, so the delay tells nothing about which names exist.
///
/// # Memory
///
/// Both tables have a fixed size, allocated once, and no operation scans
/// them. Addresses live in a set-associative table ([`ADDR_SETS`] sets of
/// [`ADDR_WAYS`]); an address not in its set starts with a full budget, and
/// a new address replaces the entry in its set whose debt ends first. A flood
/// of new addresses can therefore only hand *itself* fresh budgets (each of
/// its addresses has one anyway); it never charges an innocent address.
/// The `governor` crate's keyed limiter was considered: its state map grows
/// with every distinct key until `retain_recent` scans all of it.
pub struct AuthLimiter {
    /// 0 disables the per-address rule.
    per_minute: u32,
    interval: Duration,
    tolerance: Duration,
    ipv6_prefix: u8,
    hasher: RandomState,
    sets: Box<[Mutex<[Option<AddrEntry>; ADDR_WAYS]>]>,
    /// Theoretical arrival time of each name slot's failure debt.
    names: Box<[Mutex<Option<Instant>>]>,
}

#[derive(Debug, Clone, Copy)]
struct AddrEntry {
    key: AddrKey,
    /// GCRA theoretical arrival time: the budget is spent up to here.
    tat: Instant,
}

/// Sets of the address table.
pub const ADDR_SETS: usize = 2048;
/// Entries per set of the address table.
pub const ADDR_WAYS: usize = 8;
/// Slots of the user-name table.
const NAME_SLOTS: usize = 1024;
/// A failure against a name is forgotten after this long (failures add up).
const NAME_FAILURE_MEMORY: Duration = Duration::from_secs(6);
/// Recent failures against one name that cost no delay (typos).
const NAME_FREE_FAILURES: u32 = 10;
/// Delay per recent failure beyond the free ones.
const NAME_DELAY_STEP: Duration = Duration::from_millis(200);
/// Longest delay a name's failures add to a guess.
pub const NAME_DELAY_CAP: Duration = Duration::from_secs(2);

impl AuthLimiter {
    /// `per_minute` guesses a minute per source address (0 = no
    /// per-address limit); IPv6 sources are keyed by their first
    /// `ipv6_prefix` bits.
    pub fn new(per_minute: u32, ipv6_prefix: u8) -> AuthLimiter {
        let interval = match per_minute {
            0 => Duration::ZERO,
            n => Duration::from_secs(60) / n,
        };
        AuthLimiter {
            per_minute,
            interval,
            tolerance: interval * per_minute.saturating_sub(1),
            ipv6_prefix,
            hasher: RandomState::new(),
            sets: (0..ADDR_SETS).map(|_| Mutex::new([None; ADDR_WAYS])).collect(),
            names: (0..NAME_SLOTS).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// The key `ip` is limited by.
    pub fn key(&self, ip: IpAddr) -> AddrKey {
        AddrKey::new(ip, self.ipv6_prefix)
    }

    /// Charges one guess from `ip` at `now`. `false` when its address is
    /// over the limit: the guess is refused and not charged.
    pub fn try_charge(&self, ip: IpAddr, now: Instant) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let key = self.key(ip);
        let mut set = self.set(key).lock();
        if let Some(entry) = set.iter_mut().flatten().find(|e| e.key == key) {
            let tat = entry.tat.max(now);
            if tat.saturating_duration_since(now) > self.tolerance {
                return false;
            }
            entry.tat = tat + self.interval;
            return true;
        }
        // Not tracked: a full budget. Take an empty way, or the one whose
        // debt ends first.
        let victim = set
            .iter_mut()
            .min_by_key(|e| e.map(|e| e.tat))
            .expect("ADDR_WAYS > 0");
        *victim = Some(AddrEntry {
            key,
            tat: now + self.interval,
        });
        true
    }

    /// Gives back the guess charged for `ip` (the AUTH succeeded).
    pub fn refund(&self, ip: IpAddr) {
        if self.per_minute == 0 {
            return;
        }
        let key = self.key(ip);
        let mut set = self.set(key).lock();
        if let Some(entry) = set.iter_mut().flatten().find(|e| e.key == key) {
            entry.tat = entry.tat.checked_sub(self.interval).unwrap_or(entry.tat);
        }
    }

    /// Counts one failed guess against `username` at `now`.
    pub fn record_name_failure(&self, username: &str, now: Instant) {
        let mut tat = self.name_slot(username).lock();
        let from = tat.map_or(now, |t| t.max(now));
        *tat = Some(from + NAME_FAILURE_MEMORY);
    }

    /// How long a guess for `username` at `now` waits before it is checked:
    /// 0 up to [`NAME_FREE_FAILURES`] recent failures, then
    /// [`NAME_DELAY_STEP`] more per failure, at most [`NAME_DELAY_CAP`].
    pub fn name_delay(&self, username: &str, now: Instant) -> Duration {
        let Some(tat) = *self.name_slot(username).lock() else {
            return Duration::ZERO;
        };
        let debt = tat.saturating_duration_since(now);
        let recent = (debt.as_millis() / NAME_FAILURE_MEMORY.as_millis()) as u32;
        NAME_DELAY_STEP
            .saturating_mul(recent.saturating_sub(NAME_FREE_FAILURES))
            .min(NAME_DELAY_CAP)
    }

    fn set(&self, key: AddrKey) -> &Mutex<[Option<AddrEntry>; ADDR_WAYS]> {
        let index = self.hasher.hash_one(key) as usize % self.sets.len();
        &self.sets[index]
    }

    fn name_slot(&self, username: &str) -> &Mutex<Option<Instant>> {
        let index = self.hasher.hash_one(username) as usize % self.names.len();
        &self.names[index]
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
    fn beside_a_hash_plaintext_secrets_are_hashed_with_its_parameters() {
        let cheap = argon2::Params::new(64, 1, 1, None).unwrap();
        let hash = hash_with(b"s3cret", cheap).unwrap();
        let creds = Credentials::parse(&format!("alice:{hash},bob:pw")).unwrap();
        let Some(Secret::Argon2id(bob)) = creds.users.get("bob") else {
            panic!("bob's plaintext secret was kept")
        };
        assert!(bob.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{bob}");
        let dummy = creds.dummy.as_deref().unwrap();
        assert!(dummy.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{dummy}");
        assert!(creds.verify("bob", "pw"));
        assert!(!creds.verify("bob", "pw2"));
        assert!(creds.verify("alice", "s3cret"));
        assert!(!creds.verify("carol", "pw"));
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
    fn limiter_allows_n_guesses_a_minute_then_refills() {
        let limiter = AuthLimiter::new(5, 64);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(limiter.try_charge(ip, t0));
        }
        assert!(!limiter.try_charge(ip, t0));
        assert!(limiter.try_charge(other, t0), "limits are per address");
        assert!(!limiter.try_charge(ip, t0 + Duration::from_secs(11)));
        assert!(limiter.try_charge(ip, t0 + Duration::from_secs(12)));
        assert!(!limiter.try_charge(ip, t0 + Duration::from_secs(12)));
        // A refund gives the guess back.
        limiter.refund(ip);
        assert!(limiter.try_charge(ip, t0 + Duration::from_secs(12)));
        assert!(AuthLimiter::new(0, 64).try_charge(ip, t0), "0 disables it");
    }

    #[test]
    fn ipv6_sources_share_a_budget_per_prefix() {
        let limiter = AuthLimiter::new(2, 64);
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(limiter.try_charge(a, t0));
        assert!(limiter.try_charge(b, t0));
        assert!(!limiter.try_charge(a, t0), "same /64");
        assert!(limiter.try_charge(c, t0), "another /64");
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(
            AddrKey::new(mapped, 64),
            AddrKey::new("10.1.2.3".parse().unwrap(), 64)
        );
        assert_eq!(AddrKey::new(a, 0), AddrKey::new(c, 0));
        assert_ne!(AddrKey::new(a, 128), AddrKey::new(b, 128));
    }

    #[test]
    fn a_flood_of_new_addresses_never_limits_an_untouched_one() {
        let limiter = AuthLimiter::new(1, 64);
        let t0 = Instant::now();
        // Far more addresses than the table holds, each spending its budget.
        for i in 0..(ADDR_SETS * ADDR_WAYS * 2) as u32 {
            let ip = IpAddr::V4((0x0a00_0000 + i).into());
            assert!(limiter.try_charge(ip, t0));
        }
        assert!(limiter.try_charge("192.0.2.1".parse().unwrap(), t0));
        assert!(!limiter.try_charge("192.0.2.1".parse().unwrap(), t0));
    }

    #[test]
    fn failures_against_a_name_add_a_growing_capped_delay() {
        let limiter = AuthLimiter::new(5, 64);
        let t0 = Instant::now();
        for _ in 0..NAME_FREE_FAILURES {
            limiter.record_name_failure("alice", t0);
        }
        assert_eq!(limiter.name_delay("alice", t0), Duration::ZERO, "typos are free");
        limiter.record_name_failure("alice", t0);
        let one = limiter.name_delay("alice", t0);
        limiter.record_name_failure("alice", t0);
        let two = limiter.name_delay("alice", t0);
        assert!(Duration::ZERO < one && one < two, "{one:?} {two:?}");
        for _ in 0..100 {
            limiter.record_name_failure("alice", t0);
        }
        assert_eq!(limiter.name_delay("alice", t0), NAME_DELAY_CAP);
        // Failures are forgotten over time.
        assert_eq!(
            limiter.name_delay("alice", t0 + NAME_FAILURE_MEMORY * 200),
            Duration::ZERO
        );
    }
}
