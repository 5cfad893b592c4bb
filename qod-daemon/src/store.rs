//! The session store: an embedded transactional database (redb). A session is written before the
//! API acknowledges it, and read back at start so a restart loses nothing that was acknowledged.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::model::{SessionId, SessionRequest, StatusInfo};

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions_v1");
/// Facts about the store itself (the boot it was last written in).
const META: TableDefinition<&str, &str> = TableDefinition::new("meta_v1");

/// A session as persisted: what was asked and what happened; rules, classes and counters are
/// derived again at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    pub id: SessionId,
    pub request: SessionRequest,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// Granted overall duration in seconds, extensions included.
    pub duration: u32,
    /// Set once the session ended.
    pub ended: Option<Ended>,
    /// Its counters' slot in the kernel maps while it is live.
    #[serde(default)]
    pub slot: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    pub info: StatusInfo,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the state directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("session store {path} cannot be opened (corrupt, or held by another qodd)")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    #[error("session store operation failed")]
    Db(#[from] Box<redb::Error>),
    #[error("stored session {key} is unreadable")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) `<dir>/sessions.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join("sessions.redb");
        let database = Database::create(&path).map_err(|e| StoreError::Open {
            path: path.clone(),
            source: Box::new(e),
        })?;
        // Make sure the table exists so reads on a new store find it.
        let tx = database.begin_write().map_err(db_err)?;
        tx.open_table(SESSIONS).map_err(db)?;
        tx.open_table(META).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(Self { db: database })
    }

    /// The boot id recorded by the last start (`None` on a new store).
    pub fn boot_id(&self) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(META).map_err(db)?;
        Ok(t.get("boot_id").map_err(db)?.map(|v| v.value().to_owned()))
    }

    /// Records the boot this qodd runs in.
    pub fn set_boot_id(&self, id: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(META).map_err(db)?;
            t.insert("boot_id", id).map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    /// Writes `s` durably (the commit is fsynced before this returns).
    pub fn put(&self, s: &StoredSession) -> Result<(), StoreError> {
        let value = serde_json::to_vec(s).map_err(|source| StoreError::Decode {
            key: s.id.to_string(),
            source,
        })?;
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(SESSIONS).map_err(db)?;
            t.insert(s.id.to_string().as_str(), value.as_slice())
                .map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    pub fn remove(&self, id: SessionId) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(SESSIONS).map_err(db)?;
            t.remove(id.to_string().as_str()).map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    /// Every stored session.
    pub fn load(&self) -> Result<Vec<StoredSession>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(SESSIONS).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            let s = serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                key: k.value().to_owned(),
                source,
            })?;
            out.push(s);
        }
        Ok(out)
    }
}

fn db_err(e: redb::TransactionError) -> StoreError {
    db(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ApplicationServer, DeviceId, ProfileName};

    #[test]
    fn sessions_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = StoredSession {
            id: SessionId::random(),
            request: SessionRequest {
                device: DeviceId::Ipv4 {
                    public: [10, 0, 0, 1].into(),
                    private: None,
                    public_port: Some(4000),
                },
                server: ApplicationServer {
                    ipv4: Some("192.0.2.0/24".parse().expect("net")),
                    ipv6: None,
                    given: (Some("192.0.2.0/24".into()), None),
                },
                device_ports: None,
                server_ports: None,
                profile: ProfileName::parse("p", "QOS_E").expect("name"),
                sink: Some("https://sink.example/cb".into()),
                sink_credential: None,
                duration: 60,
                owner: "client-a".into(),
                subject: Some(DeviceId::PhoneNumber(
                    crate::model::PhoneNumber::parse("p", "+34600000001").expect("number"),
                )),
            },
            started_at: OffsetDateTime::UNIX_EPOCH,
            duration: 60,
            ended: Some(Ended {
                info: StatusInfo::DurationExpired,
                at: OffsetDateTime::UNIX_EPOCH,
            }),
            slot: Some(3),
        };
        {
            let store = Store::open(dir.path()).expect("open");
            store.put(&s).expect("put");
            assert_eq!(store.boot_id().expect("meta"), None);
            store.set_boot_id("b1").expect("meta");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.load().expect("load"), vec![s.clone()]);
        assert_eq!(store.boot_id().expect("meta").as_deref(), Some("b1"));
        store.remove(s.id).expect("remove");
        assert!(store.load().expect("load").is_empty());
    }
}
