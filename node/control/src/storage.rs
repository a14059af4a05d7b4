//! Raft log and state machine, persisted in one redb file (`raft.redb` in the data dir).
//!
//! Tables: `log` (index → MessagePack entry), `meta` (vote, committed, last purged id) and
//! `sm` (last applied id, membership, the whole [`ControlState`], the current snapshot).
//! The state machine writes its state in the same transaction as the applied log id, so a
//! restart resumes exactly where it stopped.

// openraft's storage traits fix `StorageError` as the error type; helpers return it as is.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::state::{CommandResult, ControlState, ControlView};
use crate::TypeConfig;

type NodeId = u64;
type Node = openraft::BasicNode;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SM: TableDefinition<&str, &[u8]> = TableDefinition::new("sm");

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(v)
}

fn dec<T: DeserializeOwned>(b: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(b)
}

fn io<E: std::error::Error + 'static>(
    f: fn(&openraft::AnyError) -> StorageIOError<NodeId>,
    e: E,
) -> StorageError<NodeId> {
    f(&openraft::AnyError::new(&e)).into()
}

fn read_err(e: &openraft::AnyError) -> StorageIOError<NodeId> {
    StorageIOError::read(e.clone())
}
fn write_err(e: &openraft::AnyError) -> StorageIOError<NodeId> {
    StorageIOError::write(e.clone())
}

/// Opens the Raft database and creates its tables.
pub fn open_db(path: &std::path::Path) -> Result<Arc<Database>, redb::Error> {
    let db = Database::create(path)?;
    let tx = db.begin_write()?;
    {
        tx.open_table(LOG)?;
        tx.open_table(META)?;
        tx.open_table(SM)?;
    }
    tx.commit()?;
    Ok(Arc::new(db))
}

fn get_meta<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
) -> Result<Option<T>, StorageError<NodeId>> {
    let tx = db.begin_read().map_err(|e| io(read_err, e))?;
    let t = tx.open_table(table).map_err(|e| io(read_err, e))?;
    match t.get(key).map_err(|e| io(read_err, e))? {
        Some(v) => Ok(Some(dec(v.value()).map_err(|e| io(read_err, e))?)),
        None => Ok(None),
    }
}

fn put_meta<T: Serialize>(db: &Database, key: &str, value: &T) -> Result<(), StorageError<NodeId>> {
    let bytes = enc(value).map_err(|e| io(write_err, e))?;
    let tx = db.begin_write().map_err(|e| io(write_err, e))?;
    {
        let mut t = tx.open_table(META).map_err(|e| io(write_err, e))?;
        t.insert(key, bytes.as_slice()).map_err(|e| io(write_err, e))?;
    }
    tx.commit().map_err(|e| io(write_err, e))
}

/// The Raft log store. Cloning shares the database (the clone is the log reader).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn new(db: Arc<Database>) -> Self {
        LogStore { db }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let tx = self.db.begin_read().map_err(|e| io(read_err, e))?;
        let t = tx.open_table(LOG).map_err(|e| io(read_err, e))?;
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let mut out = Vec::new();
        for item in t.range::<u64>(bounds).map_err(|e| io(read_err, e))? {
            let (_, v) = item.map_err(|e| io(read_err, e))?;
            out.push(dec(v.value()).map_err(|e| io(read_err, e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = get_meta(&self.db, META, "last_purged")?;
        let tx = self.db.begin_read().map_err(|e| io(read_err, e))?;
        let t = tx.open_table(LOG).map_err(|e| io(read_err, e))?;
        let last = match t.last().map_err(|e| io(read_err, e))? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = dec(v.value()).map_err(|e| io(read_err, e))?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        put_meta(&self.db, "vote", vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        get_meta(&self.db, META, "vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        put_meta(&self.db, "committed", &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(get_meta::<Option<LogId<NodeId>>>(&self.db, META, "committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let tx = self.db.begin_write().map_err(|e| io(write_err, e))?;
        {
            let mut t = tx.open_table(LOG).map_err(|e| io(write_err, e))?;
            for entry in entries {
                let bytes = enc(&entry).map_err(|e| io(write_err, e))?;
                t.insert(entry.log_id.index, bytes.as_slice()).map_err(|e| io(write_err, e))?;
            }
        }
        tx.commit().map_err(|e| io(write_err, e))?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let tx = self.db.begin_write().map_err(|e| io(write_err, e))?;
        {
            let mut t = tx.open_table(LOG).map_err(|e| io(write_err, e))?;
            t.retain_in(log_id.index.., |_, _| false).map_err(|e| io(write_err, e))?;
        }
        tx.commit().map_err(|e| io(write_err, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let bytes = enc(&log_id).map_err(|e| io(write_err, e))?;
        let tx = self.db.begin_write().map_err(|e| io(write_err, e))?;
        {
            let mut m = tx.open_table(META).map_err(|e| io(write_err, e))?;
            m.insert("last_purged", bytes.as_slice()).map_err(|e| io(write_err, e))?;
            let mut t = tx.open_table(LOG).map_err(|e| io(write_err, e))?;
            t.retain_in(..=log_id.index, |_, _| false).map_err(|e| io(write_err, e))?;
        }
        tx.commit().map_err(|e| io(write_err, e))
    }
}

/// What a snapshot holds: the applied position and the whole state.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    state: ControlState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The control-plane state machine. Readers share its [`ControlView`].
pub struct StateMachineStore {
    db: Arc<Database>,
    view: Arc<RwLock<ControlView>>,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    snapshot_seq: u64,
}

impl StateMachineStore {
    /// Loads the persisted state (empty on first start).
    pub fn load(db: Arc<Database>) -> Result<Self, StorageError<NodeId>> {
        let state: ControlState = get_meta(&db, SM, "state")?.unwrap_or_default();
        let applied: Option<LogId<NodeId>> = get_meta::<Option<LogId<NodeId>>>(&db, SM, "applied")?.flatten();
        let membership = get_meta(&db, SM, "membership")?.unwrap_or_default();
        Ok(StateMachineStore {
            db,
            view: Arc::new(RwLock::new(ControlView::from_state(state))),
            applied,
            membership,
            snapshot_seq: 0,
        })
    }

    pub fn view(&self) -> Arc<RwLock<ControlView>> {
        self.view.clone()
    }

    fn state_clone(&self) -> ControlState {
        match self.view.read() {
            Ok(v) => v.state.clone(),
            Err(poisoned) => poisoned.into_inner().state.clone(),
        }
    }

    fn persist(&self) -> Result<(), StorageError<NodeId>> {
        let state = enc(&self.state_clone()).map_err(|e| io(write_err, e))?;
        let applied = enc(&self.applied).map_err(|e| io(write_err, e))?;
        let membership = enc(&self.membership).map_err(|e| io(write_err, e))?;
        let tx = self.db.begin_write().map_err(|e| io(write_err, e))?;
        {
            let mut t = tx.open_table(SM).map_err(|e| io(write_err, e))?;
            t.insert("state", state.as_slice()).map_err(|e| io(write_err, e))?;
            t.insert("applied", applied.as_slice()).map_err(|e| io(write_err, e))?;
            t.insert("membership", membership.as_slice()).map_err(|e| io(write_err, e))?;
        }
        tx.commit().map_err(|e| io(write_err, e))
    }
}

/// Builds snapshots from a copy of the state taken when the builder was made.
pub struct SnapshotBuilder {
    db: Arc<Database>,
    state: ControlState,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let data = enc(&SnapshotBody { state: self.state.clone() }).map_err(|e| io(write_err, e))?;
        let snapshot_id = match &self.applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.seq),
            None => format!("none-{}", self.seq),
        };
        let meta = SnapshotMeta { last_log_id: self.applied, last_membership: self.membership.clone(), snapshot_id };
        let stored = enc(&StoredSnapshot { meta: meta.clone(), data: data.clone() }).map_err(|e| io(write_err, e))?;
        let tx = self.db.begin_write().map_err(|e| io(write_err, e))?;
        {
            let mut t = tx.open_table(SM).map_err(|e| io(write_err, e))?;
            t.insert("snapshot", stored.as_slice()).map_err(|e| io(write_err, e))?;
        }
        tx.commit().map_err(|e| io(write_err, e))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        {
            let mut view = match self.view.write() {
                Ok(v) => v,
                Err(poisoned) => poisoned.into_inner(),
            };
            for entry in entries {
                self.applied = Some(entry.log_id);
                let result = match entry.payload {
                    EntryPayload::Blank => CommandResult::Done,
                    EntryPayload::Normal(cmd) => view.apply(&cmd),
                    EntryPayload::Membership(m) => {
                        self.membership = StoredMembership::new(Some(entry.log_id), m);
                        CommandResult::Done
                    }
                };
                results.push(result);
            }
        }
        self.persist()?;
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        SnapshotBuilder {
            db: self.db.clone(),
            state: self.state_clone(),
            applied: self.applied,
            membership: self.membership.clone(),
            seq: self.snapshot_seq,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = dec(&data).map_err(|e| io(read_err, e))?;
        {
            let mut view = match self.view.write() {
                Ok(v) => v,
                Err(poisoned) => poisoned.into_inner(),
            };
            *view = ControlView::from_state(body.state);
        }
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.persist()?;
        let stored = enc(&StoredSnapshot { meta: meta.clone(), data }).map_err(|e| io(write_err, e))?;
        let tx = self.db.begin_write().map_err(|e| io(write_err, e))?;
        {
            let mut t = tx.open_table(SM).map_err(|e| io(write_err, e))?;
            t.insert("snapshot", stored.as_slice()).map_err(|e| io(write_err, e))?;
        }
        tx.commit().map_err(|e| io(write_err, e))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let stored: Option<StoredSnapshot> = get_meta(&self.db, SM, "snapshot")?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::StorageError;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
            let dir = tempfile::tempdir().map_err(|e| io(write_err, e))?;
            let db = open_db(&dir.path().join("raft.redb")).map_err(|e| io(write_err, e))?;
            let sm = StateMachineStore::load(db.clone())?;
            Ok((dir, LogStore::new(db), sm))
        }
    }

    /// openraft's own storage test suite, run against the redb log and state machine.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder).unwrap();
    }
}
