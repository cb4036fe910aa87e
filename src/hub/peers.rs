//! Per-source-address accounting of connections: a table of what each address holds and
//! the guard that gives a place back when dropped. Plain data structures, no sockets; the
//! accept loop takes places, the shards drop them with the connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

/// Counts what each address holds against a per-address cap. An address's entry exists
/// only while it holds something, so the table is as large as the number of distinct
/// addresses currently connected, never the number ever seen.
///
/// The count is the number of [`IpSlot`]s sharing the address's [`Entry`], so a slot is
/// one pointer: it is stored on every WebSocket connection, whose size is budgeted.
#[derive(Debug)]
pub struct PerIp {
    max: usize,
    entries: Mutex<HashMap<IpAddr, Weak<Entry>>>,
}

/// One address's share of a [`PerIp`] table; removes itself when its last slot goes.
#[derive(Debug)]
struct Entry {
    ip: IpAddr,
    table: Arc<PerIp>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut entries = self.table.entries.lock();
        // A new entry for the address may have been made since the last slot went; it is
        // not this one's to remove.
        if entries
            .get(&self.ip)
            .is_some_and(|e| std::ptr::eq(e.as_ptr(), self))
        {
            entries.remove(&self.ip);
        }
    }
}

impl PerIp {
    /// A table allowing `max` per address; 0 means no limit (and no accounting).
    pub fn new(max: usize) -> Arc<PerIp> {
        Arc::new(PerIp {
            max,
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one place for `ip`, or `None` if it already holds `max`.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        if self.max == 0 {
            return Some(IpSlot::unlimited());
        }
        let ip = ip.to_canonical();
        let mut entries = self.entries.lock();
        if let Some(entry) = entries.get(&ip).and_then(Weak::upgrade) {
            // Slots are dropped outside the lock, so the count may fall meanwhile; it
            // never rises, since places are only taken under the lock.
            if Arc::strong_count(&entry) > self.max {
                // The other slots may all have gone meanwhile, making this the last
                // reference: the entry's drop takes the lock, so release it first.
                drop(entries);
                drop(entry);
                return None;
            }
            return Some(IpSlot {
                _entry: Some(entry),
            });
        }
        let entry = Arc::new(Entry {
            ip,
            table: self.clone(),
        });
        entries.insert(ip, Arc::downgrade(&entry));
        Some(IpSlot {
            _entry: Some(entry),
        })
    }

    /// How many places `ip` holds.
    #[cfg(test)]
    pub fn count(&self, ip: IpAddr) -> usize {
        self.entries
            .lock()
            .get(&ip.to_canonical())
            .map_or(0, Weak::strong_count)
    }

    /// How many addresses hold a place.
    #[cfg(test)]
    pub fn addresses(&self) -> usize {
        self.entries.lock().len()
    }
}

/// One place held in a [`PerIp`] table; dropping it gives the place back.
///
/// The WebSocket connection's slot travels with the socket into its shard and is dropped
/// with the connection, so the per-address count follows the connection's life exactly.
#[derive(Debug, Default)]
pub struct IpSlot {
    /// Held only to be dropped: the entry's count is the number of its slots.
    _entry: Option<Arc<Entry>>,
}

impl IpSlot {
    /// A slot that counts against nothing (the limit is off, or the peer is exempt).
    pub fn unlimited() -> IpSlot {
        IpSlot { _entry: None }
    }
}
