//! Per-user and per-address caps on open live streams, so one user's token, or one client,
//! cannot take every stream slot of a process (`--max-live-streams`).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Which cap refused a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapError {
    /// The user has this many streams open already.
    #[error("user {user_id} has {limit} live streams open already (--max-live-streams-per-user); close one (a tab) or retry later")]
    User {
        /// The user.
        user_id: u64,
        /// The cap.
        limit: usize,
    },
    /// The client address has this many streams open already.
    #[error("this client address has {limit} live streams open already (--max-live-streams-per-address); close one or retry later")]
    Address {
        /// The cap.
        limit: usize,
    },
}

/// Open streams per user and per address. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StreamCaps {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    per_user: usize,
    per_address: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    users: HashMap<u64, usize>,
    addresses: HashMap<IpAddr, usize>,
}

/// One stream's place under the caps; given back when dropped (the stream ended).
#[derive(Debug)]
pub struct StreamSlot {
    inner: Arc<Inner>,
    user_id: u64,
    address: Option<IpAddr>,
}

impl StreamCaps {
    /// Caps of `per_user` streams per user and `per_address` per client address.
    pub fn new(per_user: usize, per_address: usize) -> Self {
        StreamCaps { inner: Arc::new(Inner { per_user, per_address, open: Mutex::new(Open::default()) }) }
    }

    /// A slot for a stream of `user_id` from `address` (none known: only the user cap applies).
    pub fn try_open(&self, user_id: u64, address: Option<IpAddr>) -> Result<StreamSlot, CapError> {
        let mut open = self.inner.lock();
        if open.users.get(&user_id).copied().unwrap_or(0) >= self.inner.per_user {
            return Err(CapError::User { user_id, limit: self.inner.per_user });
        }
        if let Some(address) = address {
            if open.addresses.get(&address).copied().unwrap_or(0) >= self.inner.per_address {
                return Err(CapError::Address { limit: self.inner.per_address });
            }
            *open.addresses.entry(address).or_insert(0) += 1;
        }
        *open.users.entry(user_id).or_insert(0) += 1;
        Ok(StreamSlot { inner: self.inner.clone(), user_id, address })
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // Only counters live here; a panic elsewhere leaves them consistent.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.inner.lock();
        release(&mut open.users, self.user_id);
        if let Some(address) = self.address {
            release(&mut open.addresses, address);
        }
    }
}

/// One fewer under `key`; the entry goes at zero, so the maps hold only open streams.
fn release<K: Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(count) = map.get_mut(&key) {
        *count -= 1;
        if *count == 0 {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_open_streams_and_free_them_when_dropped() {
        let caps = StreamCaps::new(2, 3);
        let address: IpAddr = [10, 0, 0, 1].into();
        let a = caps.try_open(1, Some(address)).expect("first");
        let _b = caps.try_open(1, Some(address)).expect("second");
        assert_eq!(caps.try_open(1, Some(address)).err(), Some(CapError::User { user_id: 1, limit: 2 }));
        let _c = caps.try_open(2, Some(address)).expect("another user");
        assert_eq!(caps.try_open(3, Some(address)).err(), Some(CapError::Address { limit: 3 }));
        assert!(caps.try_open(3, None).is_ok(), "no address: only the user cap");
        drop(a);
        assert!(caps.try_open(1, Some(address)).is_ok(), "a closed stream frees its place");
        assert!(caps.inner.lock().users.len() <= 3);
    }
}
