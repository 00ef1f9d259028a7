//! Keys, teams and admin accounts managed at run time: the in-memory set the request path
//! reads, built from the store and kept current.
//!
//! A key's secret is shown once, when it is made; the store keeps its SHA-256 (the secret
//! is 192 random bits, so a fast hash is enough) and a short visible prefix. Requests are
//! authenticated against an in-memory map from digest to key: no store or Redis round trip,
//! and the same cost for a config key (whose digest the `Guard` keeps the same way).
//! Digests are compared in constant time.
//!
//! Every change bumps the store's version of the set. Each instance polls that version
//! (every [`POLL`]) and reloads the whole set when it moved; with `shared_state`, the
//! instance that made a change also announces it over Redis so the others reload at once.
//! A full reload every [`FULL_RELOAD`] is the safety net. It does not know HTTP: the
//! routes are in `admin::manage`.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Budget, BudgetPeriod, GatewayKey, Limits, ModelSet, Secret, Team};
use crate::store::{Managed, Store};

/// What every runtime key starts with.
pub const KEY_PREFIX: &str = "sk-sl-";
/// How often each instance asks the store whether the set changed.
pub const POLL: Duration = Duration::from_millis(400);
/// How often the set is reloaded whole, changed or not.
pub const FULL_RELOAD: Duration = Duration::from_secs(60);

/// The SHA-256 of a presented key. Equality is constant-time.
#[derive(Clone, Copy, Eq)]
pub struct Digest([u8; 32]);

impl PartialEq for Digest {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Digest(…)")
    }
}

impl Digest {
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(bytes))
    }
}

/// A new key secret: [`KEY_PREFIX`] and 192 random bits in hex.
pub fn new_secret() -> Option<String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).ok()?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("{KEY_PREFIX}{hex}"))
}

/// A random id with a kind's prefix (`key_3f9a…`).
pub fn new_id(kind: &str) -> Option<String> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).ok()?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("{kind}_{hex}"))
}

/// What a secret shows of itself for recognition: `sk-sl-abcd`.
pub fn visible_prefix(secret: &str) -> String {
    secret.chars().take(KEY_PREFIX.len() + 4).collect()
}

/// A budget as stored and answered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BudgetRecord {
    pub tokens: Option<u64>,
    pub cost: Option<f64>,
    pub period: Period,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Day,
    Month,
    Total,
}

impl From<Budget> for BudgetRecord {
    fn from(budget: Budget) -> Self {
        Self {
            tokens: budget.tokens,
            cost: budget.cost,
            period: match budget.period {
                BudgetPeriod::Day => Period::Day,
                BudgetPeriod::Month => Period::Month,
                BudgetPeriod::Total => Period::Total,
            },
        }
    }
}

impl From<BudgetRecord> for Budget {
    fn from(record: BudgetRecord) -> Self {
        Self {
            tokens: record.tokens,
            cost: record.cost,
            period: match record.period {
                Period::Day => BudgetPeriod::Day,
                Period::Month => BudgetPeriod::Month,
                Period::Total => BudgetPeriod::Total,
            },
        }
    }
}

/// The hash of a rotated-out secret, accepted until `until_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Previous {
    pub hash: String,
    pub until_ms: i64,
}

/// A runtime key as the store keeps it (the body of its `managed` row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    /// `sk-sl-abcd`: enough to recognise the key, nothing to use it.
    pub prefix: String,
    /// SHA-256 of the secret, hex; empty once revoked.
    pub hash: String,
    pub previous: Option<Previous>,
    pub models: Vec<String>,
    pub rpm: Option<u64>,
    pub rpd: Option<u64>,
    pub tpm: Option<u64>,
    pub budget: Option<BudgetRecord>,
    /// Unix milliseconds after which the key is refused.
    pub expires_at: Option<i64>,
    pub metadata: Map<String, Value>,
    pub team: Option<String>,
    pub enabled: bool,
    /// When it was revoked (`DELETE`), if it was: refused for good, kept for its name and
    /// history.
    pub revoked_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl KeyRecord {
    pub fn limits(&self) -> Limits {
        Limits {
            rpm: self.rpm,
            rpd: self.rpd,
            tpm: self.tpm,
        }
    }
}

/// A team as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeamRecord {
    pub name: String,
    pub rpm: Option<u64>,
    pub rpd: Option<u64>,
    pub tpm: Option<u64>,
    pub budget: Option<BudgetRecord>,
    pub metadata: Map<String, Value>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What an admin account may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Reads the dashboard and the log; changes nothing.
    Viewer,
}

impl Role {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "admin" => Some(Self::Admin),
            "viewer" => Some(Self::Viewer),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Viewer => "viewer",
        }
    }
}

/// An admin account as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminRecord {
    pub name: String,
    pub role: Role,
    /// Argon2id, in the PHC string format (salt and parameters included).
    pub password_hash: String,
    pub enabled: bool,
    /// Bumped to end the account's sessions (password change, revocation): a session
    /// opened under another epoch is no longer valid.
    pub epoch: u64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A key the request path may meet: the key, and until when this digest of it holds.
#[derive(Debug, Clone)]
struct Entry {
    key: Arc<GatewayKey>,
    /// Unix milliseconds: the key's expiry or, for a rotated-out secret, its grace's end.
    not_after: Option<i64>,
}

/// The managed set at one version.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: i64,
    by_digest: HashMap<Digest, Entry>,
    /// By name.
    pub keys: BTreeMap<String, KeyRecord>,
    pub teams: BTreeMap<String, TeamRecord>,
    pub admins: BTreeMap<String, AdminRecord>,
    /// The request path's form of each key, by name (for its usage).
    pub gateway_keys: HashMap<String, Arc<GatewayKey>>,
}

impl Snapshot {
    /// Builds the set from the store's rows; a row that does not parse is skipped (and
    /// said once), never fatal.
    pub fn build(version: i64, rows: &[Managed]) -> Self {
        let mut snapshot = Snapshot {
            version,
            ..Snapshot::default()
        };
        for row in rows {
            let parsed = match row.kind.as_str() {
                "key" => serde_json::from_str::<KeyRecord>(&row.body).map(|k| {
                    snapshot.keys.insert(k.name.clone(), k);
                }),
                "team" => serde_json::from_str::<TeamRecord>(&row.body).map(|t| {
                    snapshot.teams.insert(t.name.clone(), t);
                }),
                "admin" => serde_json::from_str::<AdminRecord>(&row.body).map(|a| {
                    snapshot.admins.insert(a.name.clone(), a);
                }),
                _ => Ok(()),
            };
            if let Err(error) = parsed {
                tracing::warn!(kind = %row.kind, id = %row.id, "Skipping a managed entry the store holds in a shape this sluice does not read: {error}");
            }
        }
        let teams: HashMap<&str, Arc<Team>> = snapshot
            .teams
            .values()
            .map(|t| {
                let team = Team {
                    name: t.name.clone(),
                    limits: Limits {
                        rpm: t.rpm,
                        rpd: t.rpd,
                        tpm: t.tpm,
                    },
                    budget: t.budget.map(Budget::from),
                };
                (t.name.as_str(), Arc::new(team))
            })
            .collect();
        for record in snapshot.keys.values() {
            let key = Arc::new(GatewayKey {
                name: record.name.clone(),
                // Runtime keys have no clear secret here: only what they show.
                key: Secret::new(format!("{}…", record.prefix)),
                models: ModelSet::from_list(&record.models),
                limits: record.limits(),
                budget: record.budget.map(Budget::from),
                team: record
                    .team
                    .as_deref()
                    .and_then(|name| teams.get(name).cloned()),
            });
            snapshot
                .gateway_keys
                .insert(record.name.clone(), key.clone());
            if !record.enabled || record.revoked_at.is_some() {
                continue;
            }
            if let Some(digest) = Digest::from_hex(&record.hash) {
                snapshot.by_digest.insert(
                    digest,
                    Entry {
                        key: key.clone(),
                        not_after: record.expires_at,
                    },
                );
            }
            if let Some(previous) = &record.previous {
                if let Some(digest) = Digest::from_hex(&previous.hash) {
                    let until = record
                        .expires_at
                        .map_or(previous.until_ms, |e| e.min(previous.until_ms));
                    snapshot.by_digest.insert(
                        digest,
                        Entry {
                            key,
                            not_after: Some(until),
                        },
                    );
                }
            }
        }
        snapshot
    }

    /// The key with this digest, if it is valid at `now_ms`.
    pub fn lookup(&self, digest: &Digest, now_ms: i64) -> Option<Arc<GatewayKey>> {
        let entry = self.by_digest.get(digest)?;
        entry
            .not_after
            .is_none_or(|end| now_ms < end)
            .then(|| entry.key.clone())
    }

    /// Whether any runtime key exists (revoked ones included): then a gateway without
    /// config keys is no longer open.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }
}

/// The managed set in force, and what keeps it current.
pub struct Registry {
    current: RwLock<Arc<Snapshot>>,
    store: Option<Arc<dyn Store>>,
    /// Wakes the follower thread to look at the store now (a change here or announced).
    nudge: Mutex<Option<Sender<()>>>,
    /// Failed password logins per account name (the per-address count is the admin key's
    /// throttle, shared).
    pub logins: crate::admin::throttle::AuthThrottle<String>,
    /// Password checks running at once: each takes ~19 MiB and tens of milliseconds, so a
    /// flood of logins can neither exhaust memory nor outrun the throttle's count.
    pub verifying: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("version", &self.snapshot().version)
            .finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Registry {
    /// A registry over `store`; empty (and unchangeable) without one.
    pub fn new(store: Option<Arc<dyn Store>>) -> Self {
        Self {
            current: RwLock::new(Arc::new(Snapshot::default())),
            store,
            nudge: Mutex::new(None),
            logins: Default::default(),
            verifying: tokio::sync::Semaphore::new(2),
        }
    }

    pub fn store(&self) -> Option<&Arc<dyn Store>> {
        self.store.as_ref()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The runtime key with this digest, valid at `now_ms`. A short read lock, no I/O.
    pub fn lookup(&self, digest: &Digest, now_ms: i64) -> Option<Arc<GatewayKey>> {
        match self.current.read() {
            Ok(current) => current.lookup(digest, now_ms),
            Err(poisoned) => poisoned.into_inner().lookup(digest, now_ms),
        }
    }

    /// Whether runtime keys exist (so the gateway is not open).
    pub fn has_keys(&self) -> bool {
        match self.current.read() {
            Ok(current) => current.has_keys(),
            Err(poisoned) => poisoned.into_inner().has_keys(),
        }
    }

    /// Puts `snapshot` in force as it is (the benchmark loads keys without a store).
    pub fn install(&self, snapshot: Snapshot) {
        match self.current.write() {
            Ok(mut current) => *current = Arc::new(snapshot),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(snapshot),
        }
    }

    /// Reads the whole set from the store (blocking) and puts it in force, unless a newer
    /// version already is.
    pub fn reload(&self) -> anyhow::Result<()> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let (version, rows) = store.managed()?;
        let snapshot = Arc::new(Snapshot::build(version, &rows));
        let mut current = match self.current.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        if snapshot.version >= current.version {
            *current = snapshot;
        }
        Ok(())
    }

    /// Reloads if the store's version differs from the one in force.
    fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let Some(store) = &self.store else {
            return Ok(false);
        };
        if store.managed_version()? == self.snapshot().version {
            return Ok(false);
        }
        self.reload()?;
        Ok(true)
    }

    /// Asks the follower to look at the store now.
    pub fn nudge(&self) {
        if let Ok(nudge) = self.nudge.lock() {
            if let Some(nudge) = nudge.as_ref() {
                let _ = nudge.send(());
            }
        }
    }

    /// Starts the thread that keeps the set current: a poll of the store's version every
    /// [`POLL`] (or at once when nudged), a full reload every [`FULL_RELOAD`]. It ends when
    /// the registry is dropped.
    pub fn follow(self: &Arc<Self>) -> anyhow::Result<()> {
        if self.store.is_none() {
            return Ok(());
        }
        let (nudge, nudged) = channel();
        if let Ok(mut slot) = self.nudge.lock() {
            *slot = Some(nudge);
        }
        let registry = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("sluice-registry".into())
            .spawn(move || follow(&registry, &nudged))?;
        Ok(())
    }
}

fn follow(registry: &Weak<Registry>, nudged: &Receiver<()>) {
    let mut last_full = Instant::now();
    let mut failing = false;
    loop {
        match nudged.recv_timeout(POLL) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(registry) = registry.upgrade() else {
            return;
        };
        let outcome = if last_full.elapsed() >= FULL_RELOAD {
            last_full = Instant::now();
            registry.reload().map(|()| true)
        } else {
            registry.reload_if_changed()
        };
        match outcome {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("Managed keys, teams and admins are read from the store again.");
            }
            Ok(_) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(
                    "Cannot read managed keys, teams and admins from the store ({error:#}); keeping the set in force."
                );
            }
            Err(_) => {}
        }
    }
}

/// Hashes a password with Argon2id (the crate's default parameters: 19 MiB, 2 passes).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    use argon2::password_hash::PasswordHasher;
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let hash = argon2::Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?;
    Ok(hash.to_string())
}

/// Whether `password` matches an Argon2 PHC string (compared in constant time by argon2).
pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::PasswordVerifier;
    argon2::Argon2::default()
        .verify_password(password.as_bytes(), hash)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_row(name: &str, secret: &str, enabled: bool) -> Managed {
        let record = KeyRecord {
            id: format!("key_{name}"),
            name: name.into(),
            prefix: visible_prefix(secret),
            hash: Digest::of(secret).hex(),
            previous: None,
            models: vec!["*".into()],
            rpm: None,
            rpd: None,
            tpm: None,
            budget: None,
            expires_at: Some(2_000),
            metadata: Map::new(),
            team: None,
            enabled,
            revoked_at: None,
            created_at: 0,
            updated_at: 0,
        };
        Managed {
            kind: "key".into(),
            id: record.id.clone(),
            name: name.into(),
            body: serde_json::to_string(&record).unwrap(),
        }
    }

    #[test]
    fn secrets_are_random_and_found_by_digest_until_they_expire() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 48);
        assert_eq!(visible_prefix(&a).len(), 10);
        let digest = Digest::of(&a);
        assert_eq!(Digest::from_hex(&digest.hex()), Some(digest));
        let snapshot = Snapshot::build(1, &[key_row("a", &a, true), key_row("b", &b, false)]);
        assert_eq!(snapshot.lookup(&digest, 1_000).unwrap().name, "a");
        assert!(snapshot.lookup(&digest, 2_000).is_none(), "expired");
        assert!(
            snapshot.lookup(&Digest::of(&b), 1_000).is_none(),
            "disabled"
        );
        assert!(
            !format!("{:?}", snapshot.lookup(&digest, 0).unwrap()).contains(&a[10..]),
            "the key's Debug shows no secret"
        );
    }

    #[test]
    fn a_rotated_out_secret_holds_until_its_grace_ends() {
        let (old, new) = (new_secret().unwrap(), new_secret().unwrap());
        let mut row = key_row("r", &new, true);
        let mut record: KeyRecord = serde_json::from_str(&row.body).unwrap();
        record.previous = Some(Previous {
            hash: Digest::of(&old).hex(),
            until_ms: 500,
        });
        row.body = serde_json::to_string(&record).unwrap();
        let snapshot = Snapshot::build(2, &[row]);
        assert!(snapshot.lookup(&Digest::of(&old), 499).is_some());
        assert!(snapshot.lookup(&Digest::of(&old), 500).is_none());
        assert!(snapshot.lookup(&Digest::of(&new), 1_999).is_some());
        assert!(snapshot.has_keys());
    }

    #[test]
    fn passwords_verify_only_themselves() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("correct horsf", &hash));
        assert!(!verify_password("x", "not a hash"));
    }
}
