//! The API's durable state: intentions, entries and tokens in one JSON file (the state file),
//! and beside it a journal of the writes since that file was written: each write adds one
//! JSON line naming what it changed and syncs it before it is visible, so a write costs its
//! own size, not the whole set's (with 100,000 intentions the state file is about 60 MB). The
//! journal is folded into the state file when it outgrows it, and at every start. Writes are
//! serialized.
//!
//! It stays one file: the store, the files' formats (`encode`/`decode`, the journal records)
//! and the crash tests that prove them change together.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::acl::{rfc3339, Secret};
use super::server::BOOTSTRAP_TOKEN_FILE;
use super::{Error, Policy, SharedSink, Token, TokenRequest};
use mesh_core::durable;
use mesh_core::intentions::defaults::{parse_protocol, protocol_name};
use mesh_core::intentions::permission::permissions_from_json;
use mesh_core::intentions::{
    Action, EntryIndexes, Intention, RuleSet, ServiceDefaultsEntry, ServiceIntentionsEntry,
    ServiceName, SyncOutcome,
};

/// The state file in the state directory.
pub const STATE_FILE: &str = "api-state.json";
/// The journal in the state directory: one JSON line per write since the state file was
/// written.
pub const JOURNAL_FILE: &str = "api-state.journal";
/// The journal is folded into the state file once a write would take it past this size or the
/// state file's, whichever is larger: a write then costs about its own size on average, and a
/// start reads at most about twice the state file.
const JOURNAL_MIN_LIMIT: u64 = 1 << 20;
/// The journal grows in zero-filled steps of this size, written ahead of the records: a
/// record then overwrites bytes the file already holds, so syncing it flushes its data alone
/// and never waits for the filesystem's own journal to commit a new file size (on ext4 that
/// wait was 0.2 ms typically and up to tens of ms behind other writers). A reader takes the
/// records up to the first zero byte (a record's JSON never holds one).
const JOURNAL_STEP: u64 = 1 << 20;
/// The lock file that keeps a second server off the same state directory.
pub const LOCK_FILE: &str = "api.lock";
/// The format version this build writes. Version 2 files have a journal beside them, which a
/// build that reads only version 1 would silently leave out: it refuses them instead.
const VERSION: u32 = 2;
/// The oldest version this build reads (no journal).
const OLDEST_VERSION: u32 = 1;
/// The description Consul gives the bootstrap token.
const BOOTSTRAP_DESCRIPTION: &str = "Bootstrap Token (Global Management)";

/// One consistent view of everything the API stores.
#[derive(Clone, Debug)]
pub struct State {
    pub(crate) rules: Arc<RuleSet>,
    pub(crate) tokens: Arc<Vec<Token>>,
    pub(crate) acl_index: u64,
    /// This store's identity, made at its first start: its state file and every journal record
    /// carry it, so a journal from another state directory is never replayed here.
    pub(crate) store_id: Arc<str>,
}

impl State {
    /// The intentions.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// The tokens, oldest first.
    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// The rules, to change them inside [`Store::update`] (a copy of the current ones, made on
    /// the first change: O(1), the rule set's maps are persistent).
    pub fn rules_mut(&mut self) -> &mut RuleSet {
        Arc::make_mut(&mut self.rules)
    }

    /// Adds a token made from `req`. AccessorID and SecretID are fresh UUIDs unless the
    /// request names them; named ones must be unused.
    pub(crate) fn add_token(&mut self, req: TokenRequest) -> Result<Token, Error> {
        let in_use = |f: &dyn Fn(&Token) -> bool| self.tokens.iter().any(f);
        if let Some(a) = &req.accessor_id {
            if in_use(&|t| t.accessor_id.eq_ignore_ascii_case(a)) {
                return Err(Error::bad("AccessorID", "AccessorID: already in use"));
            }
        }
        if let Some(s) = &req.secret_id {
            if in_use(&|t| t.secret_id().eq_ignore_ascii_case(s)) {
                return Err(Error::bad("SecretID", "SecretID: already in use"));
            }
        }
        let fresh = |taken: &dyn Fn(&str) -> bool| loop {
            let id = uuid::Uuid::new_v4().to_string();
            if !taken(&id) {
                return id;
            }
        };
        let accessor_id = req
            .accessor_id
            .map(|a| a.to_ascii_lowercase())
            .unwrap_or_else(|| fresh(&|id| self.tokens.iter().any(|t| t.accessor_id == id)));
        let secret = req
            .secret_id
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_else(|| fresh(&|id| self.tokens.iter().any(|t| t.secret_id() == id)));
        self.acl_index += 1;
        let token = Token {
            accessor_id,
            secret: Secret::new(secret),
            description: req.description,
            policies: req.policies,
            create_time: SystemTime::now(),
            create_index: self.acl_index,
            modify_index: self.acl_index,
        };
        Arc::make_mut(&mut self.tokens).push(token.clone());
        Ok(token)
    }

    /// Removes the token with this AccessorID.
    pub(crate) fn remove_token(&mut self, accessor_id: &str) -> Result<Token, Error> {
        let pos = self
            .tokens
            .iter()
            .position(|t| t.accessor_id == accessor_id)
            .ok_or_else(|| Error::NotFound("ACL token not found".into()))?;
        self.acl_index += 1;
        Ok(Arc::make_mut(&mut self.tokens).remove(pos))
    }
}

/// The durable store. Reads see a consistent [`State`] without waiting; writes are serialized
/// and each is on disk before it is visible.
pub struct Store {
    path: PathBuf,
    _lock: Flock<File>,
    /// The journal; its lock orders the writers.
    writer: Mutex<Journal>,
    current: ArcSwap<State>,
    sink: SharedSink,
    max_intentions: usize,
    /// Sent after every visible change, for blocking queries.
    changed: tokio::sync::watch::Sender<()>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens the store in `dir` (created if missing): takes the directory's lock, loads the
    /// state file, or on first start creates it with a bootstrap token, which is returned
    /// (and written to `<dir>/acl-bootstrap-token`, mode 0600). `default_policy` is the
    /// default intention policy, a configuration value that is not stored. `sink` is told the
    /// loaded rules at once and every change after.
    ///
    /// # Errors
    /// [`Error::Locked`] when another process holds the lock, [`Error::Corrupt`] when the
    /// state file cannot be loaded, [`Error::Io`] when a file cannot be made or read.
    pub fn open(
        dir: &Path,
        default_policy: Action,
        sink: SharedSink,
    ) -> Result<(Store, Option<String>), Error> {
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            if e == nix::errno::Errno::EWOULDBLOCK {
                Error::Locked {
                    dir: dir.to_owned(),
                    lock: lock_path.clone(),
                }
            } else {
                Error::Io {
                    what: "locking",
                    path: lock_path.clone(),
                    source: e.into(),
                }
            }
        })?;
        let path = dir.join(STATE_FILE);
        let journal_path = dir.join(JOURNAL_FILE);
        let (mut state, bootstrap, snapshot_len, fold) = match std::fs::read(&path) {
            Ok(bytes) => {
                let mut file = parse_state_file(&path, &bytes)?;
                let without_id = file.store_id.is_empty();
                let journal = match std::fs::read(&journal_path) {
                    Ok(journal) => journal,
                    Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
                    Err(e) => return Err(io_err("reading", &journal_path)(e)),
                };
                let replayed = replay(&journal_path, &journal, &mut file)?;
                let state = state_from_file(&path, file).map_err(|e| match e {
                    Error::Corrupt { path, message } if replayed > 0 => Error::Corrupt {
                        path,
                        message: format!(
                            "{message} (after {replayed} writes of {} replayed)",
                            journal_path.display()
                        ),
                    },
                    e => e,
                })?;
                // Fold the journal in, and give a version 1 file its store ID before any
                // record names it.
                let fold = (!journal.is_empty() || without_id).then_some(replayed);
                (state, None, bytes.len() as u64, fold)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // A journal without a state file belongs to no state (the state file is
                // written first of all): a fresh start.
                match std::fs::remove_file(&journal_path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("removing", &journal_path)(e)),
                }
                let mut state = State {
                    rules: Arc::new(RuleSet::with_default_policy(default_policy)),
                    tokens: Arc::new(Vec::new()),
                    acl_index: 0,
                    store_id: new_store_id(),
                };
                let token = state.add_token(TokenRequest::new(
                    BOOTSTRAP_DESCRIPTION,
                    vec![Policy::Operator],
                ))?;
                // The token file first: a crash before the state file exists makes a new
                // bootstrap token on the next start, which overwrites it.
                let token_path = dir.join(BOOTSTRAP_TOKEN_FILE);
                durable::write(
                    &token_path,
                    format!("{}\n", token.secret_id()).as_bytes(),
                    0o600,
                )
                .map_err(io_err("writing", &token_path))?;
                let bytes = encode(&state);
                durable::write(&path, &bytes, 0o600).map_err(io_err("writing", &path))?;
                info!(
                    accessor = %token.accessor_id,
                    file = %token_path.display(),
                    "created the ACL bootstrap token"
                );
                (
                    state,
                    Some(token.secret_id().to_owned()),
                    bytes.len() as u64,
                    None,
                )
            }
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        let mut journal = Journal::open(journal_path, snapshot_len)?;
        if let Some(replayed) = fold {
            // The state file first, then the journal emptied (a crash between the two leaves
            // records the state file holds: skipped).
            journal.fold(&path, &encode(&state))?;
            info!(
                writes = replayed,
                journal = %journal.path.display(),
                "folded the journal into the state file"
            );
        }
        if state.rules.default_policy() != default_policy {
            state.rules_mut().set_default_policy(default_policy);
        }
        sink.rules_changed(&state.rules);
        let store = Store {
            path,
            _lock: lock,
            writer: Mutex::new(journal),
            current: ArcSwap::from_pointee(state),
            sink,
            max_intentions: usize::MAX,
            changed: tokio::sync::watch::Sender::new(()),
        };
        Ok((store, bootstrap))
    }

    /// Refuses, from now on, every write that would leave more than `max` intentions (what
    /// the kernel's intention map holds, one compiled entry per intention): such a write
    /// fails with [`Error::TooManyIntentions`] and changes nothing. Writes that do not add
    /// intentions are accepted even when the stored set is already over `max` (a lowered
    /// limit), so that it can be brought back under. No limit until this is called.
    pub fn set_max_intentions(&mut self, max: usize) {
        let n = self.current.load().rules.len();
        if n > max {
            warn!(
                intentions = n,
                max_intentions = max,
                "the stored intentions exceed what the kernel holds; writes that add \
                 intentions are refused until some are deleted"
            );
        }
        self.max_intentions = max;
    }

    /// The most intentions a write may leave (see [`Store::set_max_intentions`]).
    pub fn max_intentions(&self) -> usize {
        self.max_intentions
    }

    /// The state now.
    pub fn state(&self) -> Arc<State> {
        self.current.load_full()
    }

    /// A receiver that wakes after every change the store makes visible.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies `f` to a copy of the state; when it succeeds and changed something, writes the
    /// change durably (a journal record, or the whole state file when the journal is folded
    /// in), makes the new state current and, if the rules changed, tells the sink. When `f` or
    /// the write fails, nothing changes. Blocks on the disk: call it from a blocking thread.
    ///
    /// # Errors
    /// `f`'s error, [`Error::TooManyIntentions`] when the rules would exceed the limit, or
    /// [`Error::Io`] when the journal or the state file cannot be written.
    pub fn update<T>(&self, f: impl FnOnce(&mut State) -> Result<T, Error>) -> Result<T, Error> {
        // A panic while the lock was held leaves the journal as its last completed call did.
        let mut journal = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load_full();
        let mut next = (*old).clone();
        let out = f(&mut next)?;
        let rules_changed = next.rules.index() != old.rules.index();
        let count = next.rules.len();
        if rules_changed && count > self.max_intentions && count > old.rules.len() {
            return Err(Error::TooManyIntentions {
                count,
                limit: self.max_intentions,
            });
        }
        if !rules_changed && next.acl_index == old.acl_index {
            return Ok(out);
        }
        let record = journal_record(&old, &next).map_err(io_err("encoding", &journal.path))?;
        journal.write(&self.path, &record, || encode(&next))?;
        let next = Arc::new(next);
        self.current.store(next.clone());
        self.changed.send_replace(());
        if rules_changed {
            self.sink.rules_changed(&next.rules);
        }
        Ok(out)
    }

    /// Folds the journal into the state file once a write would take it past `bytes`,
    /// whatever the state file's size (0: every write rewrites the state file).
    #[cfg(test)]
    fn set_journal_limit(&self, bytes: u64) {
        let mut journal = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        journal.fixed_limit = Some(bytes);
    }

    /// Drops the store as a kill would leave it: the journal not folded in.
    #[cfg(test)]
    fn drop_as_killed(self) {
        let mut journal = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        journal.fold_on_drop = false;
        drop(journal);
        drop(self);
    }
}

/// The journal file: records, then zeros written ahead of them.
struct Journal {
    file: File,
    path: PathBuf,
    /// The end of the last complete record.
    len: u64,
    /// The file's length: zeros from `len` to here, written ahead (see [`JOURNAL_STEP`]).
    allocated: u64,
    /// The state file's length when last written or read.
    snapshot_len: u64,
    /// See [`JOURNAL_MIN_LIMIT`].
    min_limit: u64,
    /// Tests: fold when the journal would pass this size, whatever the state file's.
    fixed_limit: Option<u64>,
    /// Fold the journal in when the store is dropped (tests turn it off to stand for a kill).
    fold_on_drop: bool,
    /// The next write must rewrite the state file and empty the journal instead of writing a
    /// record: a failed write may have left part of a record that could not be cut off, or
    /// the journal could not be emptied (its end is then not where `len` says).
    damaged: bool,
}

impl Journal {
    /// Writes the state file (`bytes`, the whole current state) and empties the journal.
    fn fold(&mut self, state_path: &Path, bytes: &[u8]) -> Result<(), Error> {
        durable::write(state_path, bytes, 0o600).map_err(io_err("writing", state_path))?;
        self.snapshot_len = bytes.len() as u64;
        // The write is durable now. Records left in the journal if emptying it fails are in
        // the state file already and a start skips them (see `replay`). The next write folds
        // again rather than writing a record: where the journal ends is not known then (its
        // length may or may not have reached the disk), and a record written after zeros, or
        // with zeros before it, would be left out.
        match self.file.set_len(0).and_then(|()| self.file.sync_data()) {
            Ok(()) => {
                self.len = 0;
                self.allocated = 0;
                self.damaged = false;
            }
            Err(e) => {
                self.damaged = true;
                warn!(
                    journal = %self.path.display(),
                    error = %e,
                    "could not empty the journal after writing the state file"
                );
            }
        }
        Ok(())
    }

    fn open(path: PathBuf, snapshot_len: u64) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        // A start folds a journal that holds anything, zeros included, and empties it; if that
        // fails, the journal is `damaged` and the first write folds it.
        let len = file.metadata().map_err(io_err("reading", &path))?.len();
        // The journal's directory entry must last as its records do.
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("syncing", dir))?;
        }
        Ok(Journal {
            file,
            path,
            len,
            allocated: len,
            snapshot_len,
            min_limit: JOURNAL_MIN_LIMIT,
            fixed_limit: None,
            fold_on_drop: true,
            damaged: len > 0,
        })
    }

    /// Makes one write durable: writes `record` after the last one and syncs it, or, when the
    /// journal would outgrow its limit (or is damaged), writes the state file `snapshot`
    /// gives and empties the journal. On an error the write did not happen, and the journal
    /// ends with its last complete record (or is marked damaged).
    fn write(
        &mut self,
        state_path: &Path,
        record: &[u8],
        snapshot: impl FnOnce() -> Vec<u8>,
    ) -> Result<(), Error> {
        let limit = self
            .fixed_limit
            .unwrap_or(self.min_limit.max(self.snapshot_len));
        if self.damaged || self.len + record.len() as u64 > limit {
            return self.fold(state_path, &snapshot());
        }
        let end = self.len + record.len() as u64;
        let written = self
            .file
            .write_all_at(record, self.len)
            .and_then(|()| self.zero_ahead(end))
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len = end;
                Ok(())
            }
            Err(e) => {
                // Cut off what part of the record may have reached the file (and the zeros
                // ahead), so that the next record starts a line of its own.
                self.allocated = self.len;
                if self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_data())
                    .is_err()
                {
                    self.damaged = true;
                }
                Err(io_err("writing to", &self.path)(e))
            }
        }
    }

    /// Makes the file hold zeros from `end` to the next [`JOURNAL_STEP`] boundary when a
    /// record ending at `end` went past what was written ahead. The zeros only make later
    /// syncs cheaper: when they cannot be written (a full disk), the file ends with the record
    /// and the write goes on without them.
    fn zero_ahead(&mut self, end: u64) -> std::io::Result<()> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        if end <= self.allocated {
            return Ok(());
        }
        let target = end.div_ceil(JOURNAL_STEP) * JOURNAL_STEP;
        let mut at = end;
        while at < target {
            let n = (target - at).min(ZEROS.len() as u64);
            if let Err(e) = self.file.write_all_at(&ZEROS[..n as usize], at) {
                warn!(
                    journal = %self.path.display(),
                    error = %e,
                    "could not write the journal's zeros ahead; its records are appended"
                );
                self.file.set_len(end)?;
                self.allocated = end;
                return Ok(());
            }
            at += n;
        }
        self.allocated = target;
        Ok(())
    }
}

impl Store {
    /// Refuses every intention write through the API from now on (`meshd kubernetes`: the
    /// `ServiceIntentions` objects are the only source); reads still work. Not stored.
    ///
    /// # Errors
    /// As [`Store::update`].
    pub fn set_kubernetes_only(&self) -> Result<(), Error> {
        // Made current directly: `update` keeps only states whose rules index or ACL index
        // moved, and this flag moves neither (the flag then carries over to every later state,
        // each a copy of the current one).
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = (*self.current.load_full()).clone();
        next.rules_mut().set_kubernetes_only(true);
        self.current.store(Arc::new(next));
        Ok(())
    }

    /// Makes the Kubernetes-managed intentions exactly `entries` and the managed
    /// `service-defaults` entries exactly `defaults` (see `RuleSet::sync_kubernetes_entries`,
    /// `RuleSet::write_kubernetes_defaults`), durably. Blocks on the disk.
    ///
    /// # Errors
    /// As [`Store::update`].
    pub fn sync_kubernetes_entries(
        &self,
        entries: &[ServiceIntentionsEntry],
        defaults: &[ServiceDefaultsEntry],
    ) -> Result<KubernetesSync, Error> {
        self.update(|s| {
            let rules = s.rules_mut();
            // Defaults first (L7 intentions need their destination's http), stale ones last.
            let mut service_defaults = rules.write_kubernetes_defaults(defaults);
            let intentions = rules.sync_kubernetes_entries(entries);
            service_defaults.extend(rules.remove_stale_kubernetes_defaults(defaults));
            Ok(KubernetesSync {
                intentions,
                service_defaults,
            })
        })
    }
}

impl Drop for Store {
    /// Folds the journal into the state file, so that after a clean stop the state file alone
    /// holds every write (a backup or a downgrade that takes only it loses nothing). Best
    /// effort: on an error the journal stays and the next start folds it.
    fn drop(&mut self) {
        let journal = self.writer.get_mut().unwrap_or_else(|e| e.into_inner());
        if !journal.fold_on_drop || (journal.len == 0 && !journal.damaged) {
            return;
        }
        let state = self.current.load_full();
        if let Err(e) = journal.fold(&self.path, &encode(&state)) {
            warn!(error = %e, "could not fold the journal into the state file at stop");
        }
    }
}

/// How a [`Store::sync_kubernetes_entries`] fared: one outcome per destination of a
/// `ServiceIntentions` object, and per service of a `ServiceDefaults` object written or removed.
#[derive(Debug)]
pub struct KubernetesSync {
    /// The `service-intentions` entries, by destination.
    pub intentions: Vec<(ServiceName, SyncOutcome)>,
    /// The `service-defaults` entries, by service.
    pub service_defaults: Vec<(ServiceName, SyncOutcome)>,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { what, path, source }
}

/// The state file's shape.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    #[serde(rename = "Version")]
    version: u32,
    /// See [`State::store_id`]; absent in version 1 files.
    #[serde(rename = "StoreID", default)]
    store_id: String,
    #[serde(rename = "Index")]
    index: u64,
    #[serde(rename = "CounterWatermark")]
    counter_watermark: u32,
    #[serde(rename = "Intentions")]
    intentions: Vec<StoredIntention>,
    #[serde(rename = "Entries")]
    entries: Vec<StoredEntry>,
    /// `service-defaults` entries; absent in files written before they existed.
    #[serde(rename = "ServiceDefaults", default)]
    service_defaults: Vec<StoredDefaults>,
    #[serde(rename = "ACLIndex")]
    acl_index: u64,
    #[serde(rename = "Tokens")]
    tokens: Vec<StoredToken>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredIntention {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "SourceNS")]
    source_ns: String,
    #[serde(rename = "SourceName")]
    source_name: String,
    #[serde(rename = "DestinationNS")]
    destination_ns: String,
    #[serde(rename = "DestinationName")]
    destination_name: String,
    #[serde(rename = "Action")]
    action: Action,
    /// L7 permissions in Consul's JSON shape; absent for an L4 intention.
    #[serde(
        rename = "Permissions",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    permissions: Option<serde_json::Value>,
    #[serde(rename = "Description")]
    description: String,
    #[serde(rename = "Meta")]
    meta: BTreeMap<String, String>,
    #[serde(rename = "Precedence")]
    precedence: u8,
    #[serde(rename = "CreatedAt")]
    created_at: String,
    #[serde(rename = "UpdatedAt")]
    updated_at: String,
    #[serde(rename = "CreateIndex")]
    create_index: u64,
    #[serde(rename = "ModifyIndex")]
    modify_index: u64,
    #[serde(rename = "CounterIndex")]
    counter_index: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredEntry {
    #[serde(rename = "Namespace")]
    namespace: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Meta")]
    meta: BTreeMap<String, String>,
    #[serde(rename = "CreateIndex")]
    create_index: u64,
    #[serde(rename = "ModifyIndex")]
    modify_index: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredDefaults {
    #[serde(rename = "Namespace")]
    namespace: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Protocol")]
    protocol: String,
    #[serde(rename = "Meta")]
    meta: BTreeMap<String, String>,
    #[serde(rename = "CreateIndex")]
    create_index: u64,
    #[serde(rename = "ModifyIndex")]
    modify_index: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredToken {
    #[serde(rename = "AccessorID")]
    accessor_id: String,
    #[serde(rename = "SecretID")]
    secret_id: String,
    #[serde(rename = "Description")]
    description: String,
    #[serde(rename = "Policies")]
    policies: Vec<String>,
    #[serde(rename = "CreateTime")]
    create_time: String,
    #[serde(rename = "CreateIndex")]
    create_index: u64,
    #[serde(rename = "ModifyIndex")]
    modify_index: u64,
}

/// A journal record: what one write changed, and the write counters after it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalRecord {
    /// The store this record belongs to ([`State::store_id`]).
    #[serde(rename = "StoreID")]
    store_id: String,
    /// The write indexes of the state this write changed (`Index`, `ACLIndex` before it): the
    /// record continues exactly that state.
    #[serde(rename = "PrevIndex")]
    prev_index: u64,
    #[serde(rename = "PrevACLIndex")]
    prev_acl_index: u64,
    #[serde(rename = "Index")]
    index: u64,
    #[serde(rename = "CounterWatermark")]
    counter_watermark: u32,
    /// Intentions new or changed, whole.
    #[serde(rename = "Put", default, skip_serializing_if = "Vec::is_empty")]
    intentions_put: Vec<StoredIntention>,
    #[serde(rename = "Removed", default, skip_serializing_if = "Vec::is_empty")]
    intentions_removed: Vec<StoredPair>,
    #[serde(rename = "EntriesPut", default, skip_serializing_if = "Vec::is_empty")]
    entries_put: Vec<StoredEntry>,
    #[serde(
        rename = "EntriesRemoved",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    entries_removed: Vec<StoredName>,
    #[serde(
        rename = "ServiceDefaultsPut",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    service_defaults_put: Vec<StoredDefaults>,
    #[serde(
        rename = "ServiceDefaultsRemoved",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    service_defaults_removed: Vec<StoredName>,
    #[serde(rename = "ACLIndex")]
    acl_index: u64,
    /// Every token, when the write changed them.
    #[serde(rename = "Tokens", default, skip_serializing_if = "Option::is_none")]
    tokens: Option<Vec<StoredToken>>,
}

/// An intention's (source, destination).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredPair {
    #[serde(rename = "SourceNS")]
    source_ns: String,
    #[serde(rename = "SourceName")]
    source_name: String,
    #[serde(rename = "DestinationNS")]
    destination_ns: String,
    #[serde(rename = "DestinationName")]
    destination_name: String,
}

/// A service's or destination's name.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredName {
    #[serde(rename = "Namespace")]
    namespace: String,
    #[serde(rename = "Name")]
    name: String,
}

fn new_store_id() -> Arc<str> {
    uuid::Uuid::new_v4().to_string().into()
}

fn stored_intention(it: &Intention) -> StoredIntention {
    StoredIntention {
        id: it.id.clone(),
        source_ns: it.source.namespace().to_owned(),
        source_name: it.source.name().to_owned(),
        destination_ns: it.destination.namespace().to_owned(),
        destination_name: it.destination.name().to_owned(),
        action: it.action,
        permissions: it
            .has_permissions()
            .then(|| serde_json::to_value(&it.permissions).unwrap_or_default()),
        description: it.description.clone(),
        meta: it.meta.clone(),
        precedence: it.precedence,
        created_at: rfc3339(it.created_at),
        updated_at: rfc3339(it.updated_at),
        create_index: it.create_index,
        modify_index: it.modify_index,
        counter_index: it.counter_index,
    }
}

fn stored_entry(e: &EntryIndexes) -> StoredEntry {
    StoredEntry {
        namespace: e.destination.namespace().to_owned(),
        name: e.destination.name().to_owned(),
        meta: e.meta.clone(),
        create_index: e.create_index,
        modify_index: e.modify_index,
    }
}

fn stored_defaults(e: &ServiceDefaultsEntry) -> StoredDefaults {
    StoredDefaults {
        namespace: e.service.namespace().to_owned(),
        name: e.service.name().to_owned(),
        protocol: protocol_name(e.protocol).to_owned(),
        meta: e.meta.clone(),
        create_index: e.create_index,
        modify_index: e.modify_index,
    }
}

fn stored_tokens(tokens: &[Token]) -> Vec<StoredToken> {
    tokens
        .iter()
        .map(|t| StoredToken {
            accessor_id: t.accessor_id.clone(),
            secret_id: t.secret_id().to_owned(),
            description: t.description.clone(),
            policies: t.policies.iter().map(Policy::name).collect(),
            create_time: rfc3339(t.create_time),
            create_index: t.create_index,
            modify_index: t.modify_index,
        })
        .collect()
}

fn stored_name(name: &ServiceName) -> StoredName {
    StoredName {
        namespace: name.namespace().to_owned(),
        name: name.name().to_owned(),
    }
}

fn encode(state: &State) -> Vec<u8> {
    let rules = &state.rules;
    let file = StateFile {
        version: VERSION,
        store_id: state.store_id.to_string(),
        index: rules.index(),
        counter_watermark: rules.counter_watermark(),
        intentions: rules.list().into_iter().map(stored_intention).collect(),
        entries: rules
            .entries()
            .iter()
            .map(|e| stored_entry(&EntryIndexes::from(e)))
            .collect(),
        service_defaults: rules
            .service_defaults_list()
            .into_iter()
            .map(stored_defaults)
            .collect(),
        acl_index: state.acl_index,
        tokens: stored_tokens(&state.tokens),
    };
    // Strings, integers and string maps always serialize.
    let mut out = serde_json::to_vec_pretty(&file).unwrap_or_default();
    out.push(b'\n');
    out
}

/// The journal record of the write that made `next` from `old`: one line.
fn journal_record(old: &State, next: &State) -> std::io::Result<Vec<u8>> {
    let rules = &next.rules;
    let c = rules.changes_from(&old.rules);
    let record = JournalRecord {
        store_id: next.store_id.to_string(),
        prev_index: old.rules.index(),
        prev_acl_index: old.acl_index,
        index: rules.index(),
        counter_watermark: rules.counter_watermark(),
        intentions_put: c
            .intentions_put
            .iter()
            .map(|it| stored_intention(it))
            .collect(),
        intentions_removed: c
            .intentions_removed
            .iter()
            .map(|(src, dst)| StoredPair {
                source_ns: src.namespace().to_owned(),
                source_name: src.name().to_owned(),
                destination_ns: dst.namespace().to_owned(),
                destination_name: dst.name().to_owned(),
            })
            .collect(),
        entries_put: c.entries_put.iter().map(stored_entry).collect(),
        entries_removed: c.entries_removed.iter().map(|d| stored_name(d)).collect(),
        service_defaults_put: c
            .service_defaults_put
            .iter()
            .map(|e| stored_defaults(e))
            .collect(),
        service_defaults_removed: c
            .service_defaults_removed
            .iter()
            .map(|s| stored_name(s))
            .collect(),
        acl_index: next.acl_index,
        tokens: (next.acl_index != old.acl_index).then(|| stored_tokens(&next.tokens)),
    };
    let mut out = serde_json::to_vec(&record)?;
    out.push(b'\n');
    Ok(out)
}

/// Applies the journal's records, oldest first, to `file`; returns how many. Every write moves
/// `Index` or `ACLIndex` up and neither down, so records at or below both of the state file's
/// are in it already (written before it was, and left when a crash or an error came before
/// the journal was emptied) and are skipped; each other record must continue the state the
/// one before it left (its `PrevIndex`/`PrevACLIndex`), the first one the state file's, or the
/// journal belongs to another state file (one restored from a backup without its journal) and
/// the start stops with an error naming both; so does a record of another store
/// (`StoreID`). The records end at the first zero byte. A last line without its newline is a
/// write that was never acknowledged (a crash mid-write: its sync had not returned) and is
/// left out with a warning; any unreadable complete line is an error naming the journal and
/// the line.
fn replay(journal_path: &Path, journal: &[u8], file: &mut StateFile) -> Result<usize, Error> {
    let corrupt = |message: String| Error::Corrupt {
        path: journal_path.to_owned(),
        message,
    };
    // The records end at the first zero byte (see `JOURNAL_STEP`). After it, a crash can
    // only have left parts of the one write in flight (never acknowledged: each record is
    // synced before the next is written after it), its first part lost: at most one line
    // end, its last byte, and never a whole record. Anything else is not a write cut short:
    // an error, as an unreadable complete line is.
    let journal = match journal.iter().position(|b| *b == 0) {
        Some(end) => {
            let after = &journal[end..];
            let line_ends = after.iter().filter(|b| **b == b'\n').count();
            let first = after.iter().position(|b| *b != 0);
            let last = after.iter().rposition(|b| *b != 0);
            let whole_record = match (first, last) {
                (Some(first), Some(last)) => {
                    serde_json::from_slice::<JournalRecord>(&after[first..=last]).is_ok()
                }
                _ => false,
            };
            let last = last.map(|i| after[i]);
            if whole_record || line_ends > 1 || (line_ends == 1 && last != Some(b'\n')) {
                return Err(corrupt(format!(
                    "records after a zero byte at offset {end}: only a write cut short can be \
                     there; this journal is damaged"
                )));
            }
            if last.is_some() {
                warn!(journal = %journal_path.display(), "left out part of a journal record cut short, after zeros");
            }
            &journal[..end]
        }
        None => journal,
    };
    let mut lines: Vec<&[u8]> = journal.split(|b| *b == b'\n').collect();
    // After the last newline: empty, or a record cut short.
    if let Some(tail) = lines.pop() {
        if !tail.is_empty() {
            warn!(journal = %journal_path.display(), bytes = tail.len(), "left out a journal record cut short");
        }
    }
    // Writes are serialized and each record goes after the one before: only the last,
    // unterminated line can be a write in flight. A complete line was acknowledged: unreadable, it is an error.
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let mut de = serde_json::Deserializer::from_slice(line);
        let r = serde_path_to_error::deserialize::<_, JournalRecord>(&mut de)
            .map_err(|e| format!("{}: {}", e.path(), e.inner()))
            .and_then(|r| de.end().map(|()| r).map_err(|e| e.to_string()))
            .map_err(|e| corrupt(format!("line {}: {e}", i + 1)))?;
        if r.store_id != file.store_id {
            return Err(corrupt(format!(
                "line {}: StoreID {:?} is not the state file's ({:?}): this journal belongs to \
                 another state directory; move it away to start from the state file alone",
                i + 1,
                r.store_id,
                file.store_id
            )));
        }
        records.push(r);
    }
    let mut at = (file.index, file.acl_index);
    records.retain(|r| !(r.index <= at.0 && r.acl_index <= at.1));
    for (i, r) in records.iter().enumerate() {
        if (r.prev_index, r.prev_acl_index) != at {
            return Err(corrupt(format!(
                "a record continues Index {} and ACLIndex {} but the state {} leaves Index {} \
                 and ACLIndex {}: this journal does not belong to that state file (restored \
                 without its journal?); move the journal away to start from the state file \
                 alone",
                r.prev_index,
                r.prev_acl_index,
                if i == 0 { "file" } else { "before it" },
                at.0,
                at.1
            )));
        }
        at = (r.index, r.acl_index);
    }
    if records.is_empty() {
        return Ok(0);
    }
    type Pair = (String, String, String, String);
    let pair = |s: &StoredIntention| -> Pair {
        (
            s.source_ns.clone(),
            s.source_name.clone(),
            s.destination_ns.clone(),
            s.destination_name.clone(),
        )
    };
    let mut intentions: BTreeMap<Pair, StoredIntention> = std::mem::take(&mut file.intentions)
        .into_iter()
        .map(|s| (pair(&s), s))
        .collect();
    let mut entries: BTreeMap<(String, String), StoredEntry> = std::mem::take(&mut file.entries)
        .into_iter()
        .map(|e| ((e.namespace.clone(), e.name.clone()), e))
        .collect();
    let mut defaults: BTreeMap<(String, String), StoredDefaults> =
        std::mem::take(&mut file.service_defaults)
            .into_iter()
            .map(|e| ((e.namespace.clone(), e.name.clone()), e))
            .collect();
    let n = records.len();
    for r in records {
        for p in r.intentions_removed {
            intentions.remove(&(
                p.source_ns,
                p.source_name,
                p.destination_ns,
                p.destination_name,
            ));
        }
        for s in r.intentions_put {
            intentions.insert(pair(&s), s);
        }
        for e in r.entries_removed {
            entries.remove(&(e.namespace, e.name));
        }
        for e in r.entries_put {
            entries.insert((e.namespace.clone(), e.name.clone()), e);
        }
        for e in r.service_defaults_removed {
            defaults.remove(&(e.namespace, e.name));
        }
        for e in r.service_defaults_put {
            defaults.insert((e.namespace.clone(), e.name.clone()), e);
        }
        file.index = r.index;
        file.counter_watermark = r.counter_watermark;
        file.acl_index = r.acl_index;
        if let Some(tokens) = r.tokens {
            file.tokens = tokens;
        }
    }
    file.intentions = intentions.into_values().collect();
    file.entries = entries.into_values().collect();
    file.service_defaults = defaults.into_values().collect();
    Ok(n)
}

fn parse_state_file(path: &Path, bytes: &[u8]) -> Result<StateFile, Error> {
    let corrupt = |message: String| Error::Corrupt {
        path: path.to_owned(),
        message,
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let file: StateFile = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let at = e.path().to_string();
        if at.is_empty() || at == "." {
            corrupt(e.inner().to_string())
        } else {
            corrupt(format!("{at}: {}", e.inner()))
        }
    })?;
    de.end().map_err(|e| corrupt(e.to_string()))?;
    if !(OLDEST_VERSION..=VERSION).contains(&file.version) {
        return Err(corrupt(format!(
            "Version: {} is not a version this build reads ({OLDEST_VERSION} to {VERSION})",
            file.version
        )));
    }
    Ok(file)
}

fn state_from_file(path: &Path, file: StateFile) -> Result<State, Error> {
    let corrupt = |message: String| Error::Corrupt {
        path: path.to_owned(),
        message,
    };
    let time = |field: String, s: &str| {
        humantime::parse_rfc3339(s).map_err(|e| corrupt(format!("{field}: {e}: {s:?}")))
    };
    let name = |field: String, ns: &str, name: &str| {
        ServiceName::new(ns, name).map_err(|e| corrupt(format!("{field}: {e}")))
    };
    let mut intentions = Vec::with_capacity(file.intentions.len());
    for (i, s) in file.intentions.into_iter().enumerate() {
        let permissions = match &s.permissions {
            None => Vec::new(),
            Some(v) => permissions_from_json(&v.to_string())
                .map_err(|e| corrupt(format!("Intentions[{i}].{e}")))?,
        };
        intentions.push(Intention {
            permissions,
            source: name(
                format!("Intentions[{i}].Source"),
                &s.source_ns,
                &s.source_name,
            )?,
            destination: name(
                format!("Intentions[{i}].Destination"),
                &s.destination_ns,
                &s.destination_name,
            )?,
            created_at: time(format!("Intentions[{i}].CreatedAt"), &s.created_at)?,
            updated_at: time(format!("Intentions[{i}].UpdatedAt"), &s.updated_at)?,
            id: s.id,
            action: s.action,
            description: s.description,
            meta: s.meta,
            precedence: s.precedence,
            create_index: s.create_index,
            modify_index: s.modify_index,
            counter_index: s.counter_index,
        });
    }
    let mut entries = Vec::with_capacity(file.entries.len());
    for (i, e) in file.entries.into_iter().enumerate() {
        entries.push(EntryIndexes {
            destination: name(format!("Entries[{i}]"), &e.namespace, &e.name)?,
            meta: e.meta,
            create_index: e.create_index,
            modify_index: e.modify_index,
        });
    }
    // The default policy is configuration, set by the caller.
    let mut rules = RuleSet::restore(
        Action::Deny,
        file.index,
        file.counter_watermark,
        intentions,
        entries,
    )
    .map_err(|e| corrupt(e.to_string()))?;
    let mut defaults = Vec::with_capacity(file.service_defaults.len());
    for (i, d) in file.service_defaults.into_iter().enumerate() {
        let at = format!("ServiceDefaults[{i}]");
        let mut entry = ServiceDefaultsEntry::new(
            name(at.clone(), &d.namespace, &d.name)?,
            parse_protocol(&d.protocol, &format!("{at}.Protocol"))
                .map_err(|e| corrupt(e.to_string()))?,
        );
        entry.meta = d.meta;
        entry.create_index = d.create_index;
        entry.modify_index = d.modify_index;
        defaults.push(entry);
    }
    rules
        .restore_service_defaults(defaults)
        .map_err(|e| corrupt(e.to_string()))?;
    let mut tokens = Vec::with_capacity(file.tokens.len());
    let (mut accessors, mut secrets) = (HashSet::new(), HashSet::new());
    for (i, t) in file.tokens.into_iter().enumerate() {
        let at = |f: &str| format!("Tokens[{i}].{f}");
        if t.accessor_id.is_empty() || !accessors.insert(t.accessor_id.clone()) {
            return Err(corrupt(format!(
                "{}: empty or used twice",
                at("AccessorID")
            )));
        }
        if t.secret_id.is_empty() || !secrets.insert(t.secret_id.clone()) {
            return Err(corrupt(format!("{}: empty or used twice", at("SecretID"))));
        }
        let mut policies = Vec::with_capacity(t.policies.len());
        for (j, p) in t.policies.iter().enumerate() {
            policies.push(
                Policy::parse(p).map_err(|e| corrupt(format!("{}[{j}]: {e}", at("Policies"))))?,
            );
        }
        if t.create_index > t.modify_index || t.modify_index > file.acl_index {
            return Err(corrupt(format!(
                "{}: CreateIndex {} <= ModifyIndex {} <= ACLIndex {} does not hold",
                at("ModifyIndex"),
                t.create_index,
                t.modify_index,
                file.acl_index
            )));
        }
        tokens.push(Token {
            create_time: time(at("CreateTime"), &t.create_time)?,
            accessor_id: t.accessor_id,
            secret: Secret::new(t.secret_id),
            description: t.description,
            policies,
            create_index: t.create_index,
            modify_index: t.modify_index,
        });
    }
    Ok(State {
        rules: Arc::new(rules),
        tokens: Arc::new(tokens),
        acl_index: file.acl_index,
        // A version 1 file has none (and no journal): it gets one, written before any record.
        store_id: if file.store_id.is_empty() {
            new_store_id()
        } else {
            file.store_id.into()
        },
    })
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::NoSink;
    use mesh_core::intentions::IntentionSpec;

    const CHILD_ENV: &str = "MESH_API_CRASH_CHILD_DIR";
    const FULL_DISK_ENV: &str = "MESH_API_FULL_DISK_CHILD_DIR";
    const ACK: &str = "WROTE ";

    fn open(dir: &Path) -> Result<(Store, Option<String>), Error> {
        Store::open(dir, Action::Deny, Arc::new(NoSink))
    }

    fn spec(src: &str, dst: &str) -> IntentionSpec {
        IntentionSpec::new(
            &ServiceName::parse(src).unwrap(),
            &ServiceName::parse(dst).unwrap(),
            Action::Allow,
        )
    }

    #[test]
    fn first_open_bootstraps_and_later_opens_load() {
        let dir = tempfile::tempdir().unwrap();
        let (store, boot) = open(dir.path()).unwrap();
        let boot = boot.expect("a bootstrap token on first start");
        let on_disk = std::fs::read_to_string(dir.path().join(BOOTSTRAP_TOKEN_FILE)).unwrap();
        assert_eq!(on_disk.trim(), boot);
        for f in [STATE_FILE, BOOTSTRAP_TOKEN_FILE] {
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(dir.path().join(f)).unwrap().permissions(),
            );
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        store
            .update(|s| {
                s.rules_mut()
                    .create(&spec("web", "api"), false)
                    .map(|_| ())
                    .map_err(Into::into)
            })
            .unwrap();
        // A second store on the same directory is refused while the first holds it.
        let err = open(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{err}");
        drop(store);
        let (store, again) = open(dir.path()).unwrap();
        assert!(again.is_none(), "no second bootstrap token");
        let state = store.state();
        assert_eq!(state.rules().len(), 1);
        assert_eq!(state.tokens().len(), 1);
        assert_eq!(state.tokens()[0].secret_id(), boot);
        assert_eq!(state.tokens()[0].policies, vec![Policy::Operator]);
    }

    #[test]
    fn kubernetes_only_holds_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path()).unwrap();
        let api = ServiceName::parse("api").unwrap();
        let none = std::collections::BTreeMap::new();
        assert!(store.state().rules().check_writable(&api, &none).is_ok());
        store.set_kubernetes_only().unwrap();
        let err = store
            .state()
            .rules()
            .check_writable(&api, &none)
            .unwrap_err();
        assert!(err.to_string().contains("ServiceIntentions"), "{err}");
        // A write through the store is refused too, and nothing changes.
        let refused = store.update(|s| {
            s.rules_mut()
                .create(&spec("web", "api"), false)
                .map(|_| ())
                .map_err(Into::into)
        });
        assert!(refused.is_err());
        assert_eq!(store.state().rules().len(), 0);
        assert!(store.state().rules().check_writable(&api, &none).is_err());
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()).unwrap());
        let path = dir.path().join(STATE_FILE);
        let good = std::fs::read_to_string(&path).unwrap();
        let cases = [
            (String::new(), "EOF"),
            (good[..good.len() / 2].to_owned(), "EOF"),
            (
                good.replacen("\"Version\": 2", "\"Version\": 7", 1),
                "Version",
            ),
            (
                good.replacen("\"operator\"", "\"root\"", 1),
                "Tokens[0].Policies[0]",
            ),
            (good.replacen("\"Tokens\"", "\"Tokenz\"", 1), "Tokenz"),
        ];
        for (content, needle) in cases {
            std::fs::write(&path, &content).unwrap();
            let err = open(dir.path()).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::Corrupt { .. }), "{msg}");
            assert!(msg.contains(needle), "{needle}: {msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            // Nothing was reset: the damaged file is still there.
            assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
        }
    }

    #[test]
    fn failed_updates_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path()).unwrap();
        let files = || {
            let mut bytes = std::fs::read(store.path()).unwrap();
            bytes.extend(std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap());
            bytes
        };
        let before = files();
        let err = store
            .update(|s| {
                s.rules_mut().create(&spec("web", "api"), false)?;
                Err::<(), _>(Error::bad("x", "refused after a change"))
            })
            .unwrap_err();
        assert_eq!(err.field(), Some("x"));
        assert!(store.state().rules().is_empty());
        assert_eq!(files(), before);
    }

    /// Creates the intention `src` → `dst` through `store`.
    fn create(store: &Store, src: &str, dst: &str) {
        store
            .update(|s| {
                s.rules_mut().create(&spec(src, dst), false)?;
                Ok(())
            })
            .unwrap();
    }

    /// Asserts that opening `dir` fails as a damaged journal, with an error naming the journal
    /// and `needle`, and leaves the state file and the journal as they were; returns the error.
    fn refused_leaving_both(dir: &Path, needle: &str) -> String {
        let files = || [STATE_FILE, JOURNAL_FILE].map(|f| std::fs::read(dir.join(f)).unwrap());
        let before = files();
        let err = open(dir).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Corrupt { .. }), "{msg}");
        let journal = dir.join(JOURNAL_FILE).display().to_string();
        assert!(
            msg.contains(&journal) && msg.contains(needle),
            "{needle}: {msg}"
        );
        assert!(
            files() == before,
            "the state file or the journal was rewritten"
        );
        msg
    }

    /// One write of each kind the API makes: intentions created, changed and deleted, a
    /// `service-intentions` entry with meta written and deleted, `service-defaults` written and
    /// deleted, tokens added and removed.
    fn write_each_kind(store: &Store, round: usize) {
        use mesh_core::catalog::Protocol;
        use mesh_core::intentions::{ServiceIntentionsEntry, SourceIntention};
        let name = |s: String| ServiceName::parse(&s).unwrap();
        let rules = |f: &dyn Fn(&mut RuleSet) -> Result<(), mesh_core::intentions::Error>| {
            store
                .update(|s| f(s.rules_mut()).map_err(Into::into))
                .unwrap()
        };
        rules(&|r| {
            r.create(&spec(&format!("a{round}"), "api"), false)
                .map(|_| ())
        });
        rules(&|r| {
            r.create(&spec(&format!("b{round}"), "api"), false)
                .map(|_| ())
        });
        rules(&|r| {
            let id = r
                .get_exact(&name(format!("a{round}")), &name("api".into()))
                .unwrap()
                .id
                .clone();
            let mut changed = spec(&format!("a{round}"), "api");
            changed.action = Action::Deny;
            changed.description = format!("changed in round {round}");
            r.update(&id, &changed).map(|_| ())
        });
        rules(&|r| {
            let id = r
                .get_exact(&name(format!("b{round}")), &name("api".into()))
                .unwrap()
                .id
                .clone();
            r.delete(&id).map(|_| ())
        });
        let mut entry = ServiceIntentionsEntry::new(
            name(format!("db{round}")),
            vec![SourceIntention {
                source: name("web".into()),
                action: Action::Allow,
                permissions: Vec::new(),
                description: String::new(),
                precedence: 0,
            }],
        );
        entry.meta.insert("round".into(), round.to_string());
        rules(&|r| r.apply_entry(&entry));
        if round > 0 {
            rules(&|r| {
                r.delete_entry(&name(format!("db{}", round - 1)));
                Ok(())
            });
        }
        let defaults = ServiceDefaultsEntry::new(name(format!("http{round}")), Protocol::Http);
        rules(&|r| r.apply_service_defaults(&defaults));
        if round > 0 {
            rules(&|r| {
                r.delete_service_defaults(&name(format!("http{}", round - 1)))
                    .map(|_| ())
            });
        }
        let token = store
            .update(|s| {
                s.add_token(TokenRequest::new(
                    format!("round {round}"),
                    vec![Policy::Operator],
                ))
            })
            .unwrap();
        if round % 2 == 1 {
            store
                .update(|s| s.remove_token(&token.accessor_id))
                .unwrap();
        }
    }

    #[test]
    fn every_kind_of_write_survives_a_restart_whether_journaled_or_folded() {
        // 0: every write rewrites the state file; 1 MiB: every write is a journal record;
        // 2000 bytes: both, folding every few writes.
        for limit in [0, JOURNAL_MIN_LIMIT, 2000] {
            let dir = tempfile::tempdir().unwrap();
            for round in 0..6 {
                let (store, _) = open(dir.path()).unwrap();
                store.set_journal_limit(limit);
                write_each_kind(&store, round);
                let before = encode(&store.state());
                store.drop_as_killed();
                let (store, boot) = open(dir.path()).unwrap();
                assert!(boot.is_none());
                let after = encode(&store.state());
                assert!(
                    before == after,
                    "limit {limit}, round {round}: the state after a restart differs:\n{}\n---\n{}",
                    String::from_utf8_lossy(&before),
                    String::from_utf8_lossy(&after)
                );
                // A start folds the journal in.
                assert_eq!(
                    std::fs::metadata(dir.path().join(JOURNAL_FILE))
                        .unwrap()
                        .len(),
                    0
                );
                assert_eq!(std::fs::read(store.path()).unwrap(), after);
            }
            let (store, _) = open(dir.path()).unwrap();
            store.set_journal_limit(u64::MAX);
            write_each_kind(&store, 6);
            let before = encode(&store.state());
            // A clean stop folds the journal in: the state file alone holds every write.
            drop(store);
            assert_eq!(
                std::fs::metadata(dir.path().join(JOURNAL_FILE))
                    .unwrap()
                    .len(),
                0
            );
            assert!(std::fs::read(dir.path().join(STATE_FILE)).unwrap() == before);
            let (store, _) = open(dir.path()).unwrap();
            let state = store.state();
            assert_eq!(state.rules().len(), 7 + 1, "a0..a6 and web → db6");
            assert_eq!(
                state.tokens().len(),
                1 + 4,
                "bootstrap and rounds 0, 2, 4, 6"
            );
            assert_eq!(state.rules().service_defaults_list().len(), 1);
        }
    }

    #[test]
    fn a_write_among_many_intentions_appends_its_own_record_only() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = open(dir.path()).unwrap();
        store.set_max_intentions(usize::MAX);
        store
            .update(|s| {
                for i in 0..5000 {
                    s.rules_mut()
                        .create(&spec(&format!("s{i}"), &format!("d{i}")), false)?;
                }
                Ok(())
            })
            .unwrap();
        // That write was larger than the journal's limit: it went to the state file.
        let state_file = std::fs::read(store.path()).unwrap();
        assert!(state_file.len() > 1 << 20, "{} bytes", state_file.len());
        let journal = dir.path().join(JOURNAL_FILE);
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
        for i in 0..20 {
            create(&store, &format!("w{i}"), "api");
        }
        let grown = records(&journal).len();
        assert!(
            grown > 0 && grown < 20 * 2048,
            "20 one-intention records took {grown} bytes"
        );
        // Written ahead in zeros: no record changed the file's length, so none waited for
        // the filesystem to commit one.
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), JOURNAL_STEP);
        assert_eq!(
            std::fs::read(store.path()).unwrap(),
            state_file,
            "the state file was rewritten"
        );
        drop(store);
        let (store, _) = open(dir.path()).unwrap();
        assert_eq!(store.state().rules().len(), 5020);
    }

    #[test]
    fn a_journal_cut_short_loses_only_the_unacknowledged_write_and_a_damaged_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join(JOURNAL_FILE);
        let (store, _) = open(dir.path()).unwrap();
        for i in 0..3 {
            create(&store, &format!("s{i}"), "api");
        }
        let expected = encode(&store.state());
        store.drop_as_killed();
        let written = std::fs::read(&journal).unwrap();
        let good = records(&journal);
        assert!(written[good.len()..].iter().all(|b| *b == 0));
        let lines: Vec<&[u8]> = good.split_inclusive(|b| *b == b'\n').collect();
        assert_eq!(lines.len(), 3);
        let state_file = std::fs::read(dir.path().join(STATE_FILE)).unwrap();

        // A fourth record cut short (a crash mid-write, never acknowledged), in the zeros
        // written ahead, at the file's end, or with its first part lost and its last part
        // behind zeros: left out.
        let half = lines[2].len() / 2;
        let mut in_zeros = written.clone();
        in_zeros[good.len()..good.len() + half].copy_from_slice(&lines[2][..half]);
        let mut at_end = good.clone();
        at_end.extend_from_slice(&lines[2][..half]);
        let mut behind_zeros = written.clone();
        behind_zeros[good.len() + half..good.len() + lines[2].len()]
            .copy_from_slice(&lines[2][half..]);
        for torn in [in_zeros, at_end, behind_zeros] {
            std::fs::write(dir.path().join(STATE_FILE), &state_file).unwrap();
            std::fs::write(&journal, &torn).unwrap();
            let (store, _) = open(dir.path()).unwrap();
            assert!(encode(&store.state()) == expected);
            drop(store);
        }

        // A damaged record before the last: an error naming the journal and the line, and
        // nothing is rewritten.
        std::fs::write(dir.path().join(STATE_FILE), &state_file).unwrap();
        let mut damaged = lines[0].to_vec();
        damaged.extend_from_slice(b"{\"Index\": \"seven\"}\n");
        damaged.extend_from_slice(lines[2]);
        std::fs::write(&journal, &damaged).unwrap();
        refused_leaving_both(dir.path(), "line 2");

        // A complete last record that is unreadable was acknowledged: an error too.
        let mut damaged_last = lines[0].to_vec();
        damaged_last.extend_from_slice(lines[1]);
        damaged_last.extend_from_slice(&lines[2][..lines[2].len() / 2]);
        damaged_last.push(b'\n');
        std::fs::write(&journal, &damaged_last).unwrap();
        refused_leaving_both(dir.path(), "line 3");

        // Records after zeros are not a write cut short (zeros between records, zeros before
        // all of them, a zero byte inside a record): refused, nothing rewritten.
        let zeros = [0u8; 16];
        let between = [lines[0], lines[1], &zeros, lines[2]].concat();
        let before_all = [&zeros, good.as_slice()].concat();
        let mut inside = good.clone();
        inside[lines[0].len() + 5] = 0;
        for damaged in [between, before_all, inside] {
            std::fs::write(&journal, &damaged).unwrap();
            refused_leaving_both(dir.path(), "after a zero byte");
        }

        // A journal of another state directory, even one at the same write indexes: refused.
        let other = tempfile::tempdir().unwrap();
        let (store, _) = open(other.path()).unwrap();
        for i in 0..3 {
            create(&store, &format!("o{i}"), "api");
        }
        store.drop_as_killed();
        let foreign = std::fs::read(other.path().join(JOURNAL_FILE)).unwrap();
        std::fs::write(&journal, &foreign).unwrap();
        let msg = refused_leaving_both(dir.path(), "another state directory");
        assert!(msg.contains("StoreID"), "{msg}");
    }

    #[test]
    fn records_the_state_file_holds_are_skipped_and_a_journal_of_another_state_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join(JOURNAL_FILE);
        let (store, _) = open(dir.path()).unwrap();
        store.set_journal_limit(u64::MAX);
        let token = store
            .update(|s| s.add_token(TokenRequest::new("to revoke", vec![Policy::Operator])))
            .unwrap();
        for i in 0..3 {
            create(&store, &format!("s{i}"), "api");
        }
        let stale = records(&journal);
        let old_state_file = std::fs::read(dir.path().join(STATE_FILE)).unwrap();
        // The next write rewrites the state file; then a kill before the journal is emptied
        // (or emptying it fails): the journal still holds the four records before it.
        store.set_journal_limit(0);
        store
            .update(|s| s.remove_token(&token.accessor_id))
            .unwrap();
        store
            .update(|s| {
                let id = s.rules().list()[0].id.clone();
                s.rules_mut().delete(&id)?;
                Ok(())
            })
            .unwrap();
        let expected = encode(&store.state());
        store.drop_as_killed();
        std::fs::write(&journal, &stale).unwrap();
        let (store, _) = open(dir.path()).expect("the state loads");
        let state = store.state();
        assert!(
            encode(&state) == expected,
            "the revoked token or the deleted intention came back, or an index went back"
        );
        assert!(state
            .tokens()
            .iter()
            .all(|t| t.accessor_id != token.accessor_id));
        assert_eq!(state.rules().len(), 2);
        // Records appended after such stale ones continue the state file's state.
        store.set_journal_limit(u64::MAX);
        create(&store, "late", "api");
        let expected = encode(&store.state());
        store.drop_as_killed();
        let mut both = stale.clone();
        both.extend(records(&journal));
        std::fs::write(&journal, &both).unwrap();
        let (store, _) = open(dir.path()).unwrap();
        assert!(encode(&store.state()) == expected);
        drop(store);

        // A state file restored from before those records, with a newer journal whose records
        // do not continue it: an error naming both, nothing rewritten.
        let (store, _) = open(dir.path()).unwrap();
        store.set_journal_limit(u64::MAX);
        create(&store, "newer", "api");
        store.drop_as_killed();
        std::fs::write(dir.path().join(STATE_FILE), &old_state_file).unwrap();
        refused_leaving_both(dir.path(), "does not belong");
    }

    #[test]
    fn a_version_1_state_file_without_a_journal_is_upgraded_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path()).unwrap();
        create(&store, "web", "api");
        let before = store.state();
        drop(store);
        // As the build before the journal wrote it: version 1, no StoreID, no journal.
        let path = dir.path().join(STATE_FILE);
        let mut v1: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v1["Version"] = 1.into();
        v1.as_object_mut().unwrap().remove("StoreID");
        std::fs::write(&path, serde_json::to_vec_pretty(&v1).unwrap()).unwrap();
        std::fs::remove_file(dir.path().join(JOURNAL_FILE)).unwrap();
        let (store, boot) = open(dir.path()).expect("a version 1 file loads");
        assert!(boot.is_none());
        let after = store.state();
        assert_eq!(after.rules().len(), before.rules().len());
        assert_eq!(after.tokens().len(), before.tokens().len());
        let upgraded: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(upgraded["Version"], VERSION);
        assert_eq!(upgraded["StoreID"], *after.store_id);
    }

    /// Not a test on its own: the child process of
    /// `a_full_disk_leaves_the_zeros_out_and_the_write_goes_on`, run with `FULL_DISK_ENV` naming
    /// the state directory. Files may not grow past 64 KiB here (`RLIMIT_FSIZE`, as a full
    /// disk): one intention write must still succeed.
    #[test]
    fn full_disk_child() {
        let Some(dir) = std::env::var_os(FULL_DISK_ENV) else {
            return;
        };
        let (store, _) = open(Path::new(&dir)).unwrap();
        // SIGXFSZ blocked on this thread, the one that writes: a write past the limit fails
        // with EFBIG instead of ending the process.
        use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
        let mut xfsz = SigSet::empty();
        xfsz.add(Signal::SIGXFSZ);
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&xfsz), None).unwrap();
        use nix::sys::resource::{setrlimit, Resource};
        setrlimit(Resource::RLIMIT_FSIZE, 64 << 10, 64 << 10).unwrap();
        create(&store, "web", "api");
        store.drop_as_killed();
        println!("{ACK}web");
    }

    #[test]
    fn a_full_disk_leaves_the_zeros_out_and_the_write_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()).unwrap());
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &child_test("full_disk_child"), "--nocapture"])
            .args(["--test-threads", "1"])
            .env(FULL_DISK_ENV, dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&format!("{ACK}web")),
            "the write failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let journal = dir.path().join(JOURNAL_FILE);
        assert_eq!(
            std::fs::metadata(&journal).unwrap().len(),
            records(&journal).len() as u64,
            "the journal ends with its record"
        );
        let (store, _) = open(dir.path()).unwrap();
        let web = ServiceName::parse("web").unwrap();
        let api = ServiceName::parse("api").unwrap();
        assert!(store.state().rules().get_exact(&web, &api).is_some());
    }

    /// A journal that could not be emptied (at a start, or after a write that rewrote the state
    /// file) takes no record until it is: its end is not known, and a record written after
    /// zeros (or with zeros before it) would be left out at the next start.
    #[test]
    fn a_journal_that_could_not_be_emptied_takes_no_record_until_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let state_path = dir.path().join(STATE_FILE);
        let journal_path = dir.path().join(JOURNAL_FILE);
        // As a kill leaves it: records, then the zeros written ahead.
        let mut left = b"{\"a\":1}\n".to_vec();
        left.resize(JOURNAL_STEP as usize, 0);
        std::fs::write(&journal_path, &left).unwrap();
        let mut journal = Journal::open(journal_path.clone(), 0).unwrap();
        // No fold for size: only the emptying matters here.
        journal.fixed_limit = Some(u64::MAX);
        journal
            .write(&state_path, b"{\"b\":2}\n", || b"state 1".to_vec())
            .unwrap();
        assert_eq!(std::fs::read(&state_path).unwrap(), b"state 1");
        assert_eq!(std::fs::metadata(&journal_path).unwrap().len(), 0);

        // Emptying fails (a descriptor that cannot truncate): the write is in the state file,
        // and so is the next one, instead of a record behind what could not be emptied.
        journal
            .write(&state_path, b"{\"c\":3}\n", || unreachable!())
            .unwrap();
        journal.file = File::open(&journal_path).unwrap();
        journal.fold(&state_path, b"state 2").unwrap();
        journal
            .write(&state_path, b"{\"d\":4}\n", || b"state 3".to_vec())
            .unwrap();
        assert_eq!(std::fs::read(&state_path).unwrap(), b"state 3");
    }

    /// The name libtest knows the test `name` of this module by (its path without the crate's
    /// name), to run it alone in a child process.
    fn child_test(name: &str) -> String {
        let module = module_path!().split_once("::").map_or("", |(_, path)| path);
        format!("{module}::{name}")
    }

    /// The journal's records: its bytes up to the zeros written ahead of them.
    fn records(journal: &Path) -> Vec<u8> {
        let mut bytes = std::fs::read(journal).unwrap();
        bytes.truncate(bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len()));
        bytes
    }

    /// Not a test on its own: the child process of `kill_9_leaves_a_prefix_of_the_writes`,
    /// which runs this test binary with `CHILD_ENV` set. It writes intentions `s<n>` → `api`
    /// one by one, printing an acknowledgement after each durable write, until killed.
    #[test]
    fn crash_child() {
        let Some(dir) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let (store, _) = open(Path::new(&dir)).unwrap();
        // Fold the journal into the state file every few writes, so that kills land in
        // appends, in state file writes and in between.
        store.set_journal_limit(4096);
        let first = store.state().rules().len();
        let mut out = std::io::stdout().lock();
        for n in first..first + 100_000 {
            let s = spec(&format!("s{n}"), "api");
            store
                .update(|st| {
                    st.rules_mut()
                        .create(&s, false)
                        .map(|_| ())
                        .map_err(Into::into)
                })
                .unwrap();
            writeln!(out, "{ACK}{n}").unwrap();
            out.flush().unwrap();
        }
    }

    /// A cheap pseudo-random number from the clock (the moments only need to vary).
    fn jitter(max: u64) -> u64 {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        u64::from(nanos.wrapping_mul(2_654_435_761)) % max.max(1)
    }

    #[test]
    fn kill_9_leaves_a_prefix_of_the_writes() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()).unwrap());
        let exe = std::env::current_exe().unwrap();
        let child_test = child_test("crash_child");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut acked_total = 0usize;
        let mut rounds = 0;
        while rounds < 20 && Instant::now() < deadline {
            rounds += 1;
            let mut child = Command::new(&exe)
                .args(["--exact", &child_test, "--nocapture"])
                .args(["--test-threads", "1"])
                .env(CHILD_ENV, dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let reader = std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(n) = line.strip_prefix(ACK) {
                        let _ = tx.send(n.parse::<usize>().unwrap());
                    }
                }
            });
            // Let it start writing, then kill it at a varying moment, most likely mid-write.
            let first = rx.recv_timeout(Duration::from_secs(20));
            assert!(first.is_ok(), "the child wrote nothing");
            std::thread::sleep(Duration::from_micros(jitter(30_000)));
            child.kill().unwrap();
            child.wait().unwrap();
            reader.join().unwrap();
            let acked: Vec<usize> = first.into_iter().chain(rx.try_iter()).collect();
            let last = *acked.last().unwrap();

            let (store, boot) = open(dir.path()).expect("the state loads after kill -9");
            assert!(boot.is_none());
            let state = store.state();
            let n = state.rules().len();
            // Every acknowledged write is there, plus at most the one in flight.
            assert!(
                n == last + 1 || n == last + 2,
                "{n} intentions, last ack {last}"
            );
            let api = ServiceName::parse("api").unwrap();
            for i in 0..n {
                let src = ServiceName::parse(&format!("s{i}")).unwrap();
                assert!(
                    state.rules().get_exact(&src, &api).is_some(),
                    "s{i} missing of {n}"
                );
            }
            assert_eq!(state.tokens().len(), 1);
            acked_total = n;
        }
        eprintln!("{rounds} kill -9 rounds, {acked_total} writes survived");
        assert!(rounds >= 3, "only {rounds} rounds in time");
        assert!(
            acked_total >= rounds,
            "{acked_total} writes in {rounds} rounds"
        );
    }
}
