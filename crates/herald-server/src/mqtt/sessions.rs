//! Persistent MQTT sessions (`clean_session = 0`, MQTT 5 session expiry): the channels a
//! device subscribed and how far it got in each, kept on the node after it disconnects so
//! that its next connection recovers what it missed from channel history. Also who holds a
//! client id now, so a second connection with the same id takes the session over.
//!
//! With an engine shared between nodes the session is also kept there ([`Stored`]), saved
//! while the device is connected and when it leaves, so a device that comes back through
//! another node (its own died or was drained) resumes it there.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Instant;

use herald_core::conn::ConnHandle;
use parking_lot::Mutex;

use super::link::{Link, Sub};

/// A session as the engine keeps it for every node.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stored {
    pub user: String,
    /// Unix seconds after which it is not resumed (engines without per-key expiry keep it
    /// longer).
    pub expires: u64,
    pub subs: Vec<(String, Sub)>,
}

impl Stored {
    /// The engine key of a client id's session.
    pub fn key(client_id: &str) -> String {
        format!("mqtt.session.{client_id}")
    }

    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The stored session, when it is this user's and has not expired; anything else an
    /// engine returns (another user's, expired, unreadable) is no session.
    pub fn decode(bytes: &[u8], user: &str, unix_now: u64) -> Option<Vec<(String, Sub)>> {
        let s: Stored = serde_json::from_slice(bytes).ok()?;
        (s.user == user && unix_now < s.expires).then_some(s.subs)
    }
}

/// Sweeps expired sessions once per this many saves.
const SWEEP_EVERY: u32 = 1024;

struct Entry {
    user: String,
    subs: Vec<(String, Sub)>,
    /// None while a connection holds it.
    expires: Option<Instant>,
    live: Weak<ConnHandle>,
    /// The live connection's subscriptions, read when another connection takes over.
    link: Weak<Mutex<Link>>,
}

#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    saves: u32,
}

/// What a new connection finds under its client id.
pub struct Claimed {
    /// The stored subscriptions, when the session was kept for this user.
    pub subs: Option<Vec<(String, Sub)>>,
    /// The connection that held the id until now: it is taken over.
    pub previous: Option<Arc<ConnHandle>>,
}

impl Sessions {
    /// `conn` of `user` (subscriptions in `link`) connects as `client_id`; `resume` when it
    /// asked to keep its session. A connection still holding the id hands over where its
    /// subscriptions are now.
    pub fn claim(
        &self,
        client_id: &str,
        user: &str,
        conn: &Arc<ConnHandle>,
        link: &Arc<Mutex<Link>>,
        resume: bool,
        now: Instant,
    ) -> Claimed {
        let mut inner = self.inner.lock();
        let old = inner.entries.remove(client_id);
        let previous = old
            .as_ref()
            .and_then(|e| e.live.upgrade())
            .filter(|c| !Arc::ptr_eq(c, conn));
        let subs = old
            .filter(|e| resume && e.user == user && e.expires.is_none_or(|at| now < at))
            .map(|e| match (&previous, e.link.upgrade()) {
                (Some(_), Some(live)) => live.lock().positions(),
                _ => e.subs,
            });
        inner.entries.insert(
            client_id.to_string(),
            Entry {
                user: user.to_string(),
                subs: Vec::new(),
                expires: None,
                live: Arc::downgrade(conn),
                link: Arc::downgrade(link),
            },
        );
        Claimed { subs, previous }
    }

    /// The connection ends: its session is kept until `expires` (None: not kept). A
    /// connection that was taken over leaves the session to its successor; false then.
    pub fn release(
        &self,
        client_id: &str,
        conn: &Arc<ConnHandle>,
        subs: Vec<(String, Sub)>,
        expires: Option<Instant>,
        now: Instant,
    ) -> bool {
        let mut inner = self.inner.lock();
        let Some(e) = inner.entries.get_mut(client_id) else {
            return false;
        };
        if !std::ptr::eq(e.live.as_ptr(), Arc::as_ptr(conn)) {
            return false;
        }
        match expires {
            Some(at) => {
                e.subs = subs;
                e.expires = Some(at);
                e.live = Weak::new();
                e.link = Weak::new();
            }
            None => {
                inner.entries.remove(client_id);
            }
        }
        inner.saves = inner.saves.wrapping_add(1);
        if inner.saves.is_multiple_of(SWEEP_EVERY) {
            inner
                .entries
                .retain(|_, e| e.expires.is_none_or(|at| now < at));
        }
        true
    }

    /// Whether `conn` still holds `client_id` (it was not taken over).
    pub fn holds(&self, client_id: &str, conn: &Arc<ConnHandle>) -> bool {
        self.inner
            .lock()
            .entries
            .get(client_id)
            .is_some_and(|e| std::ptr::eq(e.live.as_ptr(), Arc::as_ptr(conn)))
    }

    /// Sessions kept or live (for tests and the admin page).
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn conn(id: &str) -> Arc<ConnHandle> {
        Arc::new(ConnHandle::new(Arc::from(id), 1 << 20))
    }

    fn link() -> Arc<Mutex<Link>> {
        Arc::new(Mutex::new(Link::new(
            herald_protocol::mqtt::Version::V5,
            8,
            1 << 20,
        )))
    }

    fn sub(offset: u64) -> Sub {
        Sub::new(1, "e".into(), offset, true)
    }

    #[test]
    fn a_kept_session_is_resumed_by_its_user_only_before_it_expires() {
        let s = Sessions::default();
        let now = Instant::now();
        let a = conn("a");
        assert!(s.claim("dev", "u", &a, &link(), true, now).subs.is_none());
        s.release(
            "dev",
            &a,
            vec![("ch".into(), sub(5))],
            Some(now + Duration::from_secs(60)),
            now,
        );
        let b = conn("b");
        let got = s
            .claim("dev", "u", &b, &link(), true, now)
            .subs
            .expect("kept");
        assert_eq!(got[0].1.offset, 5);
        s.release(
            "dev",
            &b,
            vec![("ch".into(), sub(6))],
            Some(now + Duration::from_secs(60)),
            now,
        );
        // Another user with the same client id does not get it.
        assert!(
            s.claim("dev", "other", &conn("c"), &link(), true, now)
                .subs
                .is_none()
        );
        let d = conn("d");
        s.claim("dev", "u", &d, &link(), true, now);
        s.release("dev", &d, vec![], Some(now + Duration::from_secs(1)), now);
        assert!(
            s.claim(
                "dev",
                "u",
                &conn("e"),
                &link(),
                true,
                now + Duration::from_secs(2)
            )
            .subs
            .is_none()
        );
    }

    #[test]
    fn a_stored_session_is_resumed_by_its_user_only_before_it_expires() {
        let stored = Stored {
            user: "u".into(),
            expires: 1_000,
            subs: vec![("ch".into(), sub(9))],
        };
        let bytes = stored.encode();
        assert_eq!(
            Stored::decode(&bytes, "u", 999),
            Some(vec![("ch".into(), sub(9))])
        );
        assert_eq!(Stored::decode(&bytes, "other", 999), None);
        assert_eq!(Stored::decode(&bytes, "u", 1_000), None);
        assert_eq!(Stored::decode(b"garbage", "u", 0), None);
    }

    #[test]
    fn a_second_connection_takes_the_id_over() {
        let s = Sessions::default();
        let now = Instant::now();
        let a = conn("a");
        let a_link = link();
        a_link.lock().subs.insert("ch".into(), sub(7));
        s.claim("dev", "u", &a, &a_link, true, now);
        let b = conn("b");
        let c = s.claim("dev", "u", &b, &link(), true, now);
        assert!(c.previous.is_some_and(|p| Arc::ptr_eq(&p, &a)));
        // The live connection's subscriptions go to its successor, where they are now.
        let got = c.subs.expect("handed over");
        assert_eq!((got[0].0.as_str(), got[0].1.offset), ("ch", 7));
        // The old connection's end does not overwrite its successor's session.
        s.release(
            "dev",
            &a,
            vec![("x".into(), sub(1))],
            Some(now + Duration::from_secs(9)),
            now,
        );
        s.release("dev", &b, vec![], None, now);
        assert!(s.is_empty());
    }
}
