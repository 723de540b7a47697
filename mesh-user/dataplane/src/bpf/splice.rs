//! The agent's handle on the splice maps: the proxy pairs the two app sockets of a same-node
//! connection, reports what it forwarded before the splice took over, and reads what each app
//! sent (see [`mesh_common::SpliceValue`]).

use std::sync::Mutex;

use aya::maps::{HashMap, Map, MapData, MapError};
use mesh_common::{
    SockKey, SockState, SpliceValue, MAP_SOCK_STATE, MAP_SPLICES, MAP_SPLICE_CLOSED,
};

use super::{Dataplane, Error};

/// `BPF_EXIST`: update an entry only if it is still there.
const BPF_EXIST: u64 = 2;

/// The `SPLICES` and `SOCK_STATE` maps, opened from their pins with descriptors of their own,
/// so that connections can use them without the agent's [`Dataplane`] lock. Cheap calls: one
/// `bpf(2)` each.
pub struct Splices {
    splices: Mutex<HashMap<MapData, SockKey, SpliceValue>>,
    state: HashMap<MapData, SockKey, SockState>,
    closed: Mutex<HashMap<MapData, SockKey, u64>>,
}

impl std::fmt::Debug for Splices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splices").finish_non_exhaustive()
    }
}

/// Why a connection could not be spliced; it stays on the proxy's path.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// The kernel refused the entry (the map is full, or another error).
    #[error("the kernel refused the splice entry: {0}")]
    Map(#[source] MapError),
    /// One of the app sockets is not in the sockhash (a blocking app, a full sockhash, or the
    /// socket closed already): sk_msg never sees its bytes.
    #[error("the {0} app socket is not in the sockhash")]
    NotRedirected(&'static str),
}

impl Dataplane {
    /// A handle on the splice maps, independent of `self`.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if a pin cannot be opened as its map type.
    pub fn splices(&self) -> Result<Splices, Error> {
        fn open<K: aya::Pod, V: aya::Pod>(
            dir: &std::path::Path,
            name: &'static str,
            kind: fn(MapData) -> Map,
        ) -> Result<HashMap<MapData, K, V>, Error> {
            let data = MapData::from_pin(dir.join("maps").join(name))
                .map_err(|source| Error::Map { name, source })?;
            HashMap::try_from(kind(data)).map_err(|source| Error::Map { name, source })
        }
        Ok(Splices {
            splices: Mutex::new(open(&self.dir, MAP_SPLICES, Map::HashMap)?),
            state: open(&self.dir, MAP_SOCK_STATE, Map::HashMap)?,
            closed: Mutex::new(open(&self.dir, MAP_SPLICE_CLOSED, Map::LruHashMap)?),
        })
    }
}

impl Splices {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, SockKey, SpliceValue>> {
        self.splices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pairs the client app's socket and the server app's accepted socket (each keyed as it
    /// keys itself). Both must be in the sockhash, whose close callback removes the entries
    /// with the sockets; checked after writing, so an entry never outlives its socket.
    ///
    /// # Errors
    ///
    /// [`SpliceError`]; nothing is left in the map then.
    pub fn pair(&self, client: SockKey, server: SockKey) -> Result<(), SpliceError> {
        {
            let mut map = self.map();
            for (key, peer) in [(client, server), (server, client)] {
                if let Err(e) = map.insert(key, SpliceValue { peer, forwarded: 0 }, 0) {
                    let _ = map.remove(&client);
                    let _ = map.remove(&server);
                    return Err(SpliceError::Map(e));
                }
            }
        }
        for (key, which) in [(client, "client"), (server, "server")] {
            if self.state.get(&key, 0).is_err() {
                self.unpair(client, server);
                return Err(SpliceError::NotRedirected(which));
            }
        }
        Ok(())
    }

    /// Records that the proxy has forwarded `forwarded` bytes of `key`'s app towards `peer`
    /// (every one of them written to the proxy's socket on the other side). Does nothing once the
    /// entry is gone (its socket closed).
    ///
    /// # Errors
    ///
    /// The kernel's error, other than a missing entry.
    pub fn set_forwarded(
        &self,
        key: SockKey,
        peer: SockKey,
        forwarded: u64,
    ) -> Result<(), MapError> {
        match self
            .map()
            .insert(key, SpliceValue { peer, forwarded }, BPF_EXIST)
        {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Bytes the app socket `key` has sent through sk_msg, whichever way they went: its live
    /// count, or the last one sockops kept when it closed while paired; `None` for a socket
    /// that was never paired and has left the sockhash.
    pub fn sent(&self, key: SockKey) -> Option<u64> {
        match self.state.get(&key, 0) {
            Ok(state) => Some(state.sent),
            Err(_) => self
                .closed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key, 0)
                .ok(),
        }
    }

    /// Removes every pair and every kept count except those of the app sockets in `keep`;
    /// returns how many pair entries went. For a starting agent: pairs of a previous one have
    /// no proxy left to revoke them, unless it handed them over (`keep`).
    pub fn retain(&self, keep: &std::collections::HashSet<SockKey>) -> usize {
        let mut map = self.map();
        let gone: Vec<SockKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for key in &gone {
            let _ = map.remove(key);
        }
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        let stale: Vec<SockKey> = closed
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for key in &stale {
            let _ = closed.remove(key);
        }
        gone.len()
    }

    /// The pair entry of the app socket `key`, if it is paired.
    pub fn pair_of(&self, key: SockKey) -> Option<SpliceValue> {
        self.map().get(&key, 0).ok()
    }

    /// Removes both entries of a pair and the counts of its closed sockets (missing ones are
    /// fine).
    pub fn unpair(&self, client: SockKey, server: SockKey) {
        {
            let mut map = self.map();
            let _ = map.remove(&client);
            let _ = map.remove(&server);
        }
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        let _ = closed.remove(&client);
        let _ = closed.remove(&server);
    }
}
