//! The audit trail: one line per change of a session's state (create, extend, delete, expiry,
//! termination by the network, a session that cannot be restored at start), with who asked,
//! which session, which device and the result; one line per start for the sessions it restored
//! (`action=restore sessions=N`: they were each audited when created, and a line each would
//! cost a start with a million sessions seconds). Lines go to the log under the target `qod::audit`, so an operator can route or
//! filter them (`RUST_LOG=qod::audit=info`, or the `target` field of `log_format = "json"`).
//! Never a token or a sink credential.

use qod_common::{DeviceKey, FAMILY_IPV4};

use crate::{
    error::CamaraError,
    model::{SessionId, words_ip},
};

/// The target audit lines are logged under.
pub const TARGET: &str = "qod::audit";

/// What happened to a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Create,
    Extend,
    Delete,
    /// Its duration ran out.
    Expire,
    /// The network ended it (link loss, profile withdrawn on reload, restore failure).
    Terminate,
    /// Read back from the store at start and installed for its remaining time.
    Restore,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Extend => "extend",
            Action::Delete => "delete",
            Action::Expire => "expire",
            Action::Terminate => "terminate",
            Action::Restore => "restore",
        }
    }
}

/// A device key as an operator reads it: the IPv4 address, or the IPv6 /64.
pub fn device(key: &DeviceKey) -> String {
    let ip = words_ip(key.family, &key.addr);
    if key.family == FAMILY_IPV4 {
        ip.to_string()
    } else {
        format!("{ip}/64")
    }
}

/// Logs one audit line. `result` is `Ok` or the CAMARA error the caller got.
pub fn record(
    action: Action,
    client: &str,
    session: Option<SessionId>,
    device: Option<&DeviceKey>,
    result: Result<(), &CamaraError>,
) {
    let session = session.map_or_else(|| "-".to_owned(), |s| s.to_string());
    let device = device.map_or_else(|| "-".to_owned(), self::device);
    match result {
        Ok(()) => tracing::info!(
            target: TARGET,
            action = action.as_str(),
            client,
            session,
            device,
            result = "ok",
            "audit"
        ),
        Err(e) => tracing::info!(
            target: TARGET,
            action = action.as_str(),
            client,
            session,
            device,
            result = e.code.reason(),
            reason = %e.message,
            "audit"
        ),
    }
}

/// Logs the audit line of a start that restored `sessions` live sessions from the store.
pub fn restored(sessions: usize) {
    tracing::info!(
        target: TARGET,
        action = Action::Restore.as_str(),
        client = "-",
        sessions,
        result = "ok",
        "audit"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_read_as_addresses() {
        let v4 = DeviceKey {
            family: FAMILY_IPV4,
            addr: [u32::from_ne_bytes([10, 0, 1, 2]), 0, 0, 0],
        };
        assert_eq!(device(&v4), "10.0.1.2");
        let v6 = DeviceKey {
            family: qod_common::FAMILY_IPV6,
            addr: [
                u32::from_ne_bytes([0xfd, 0, 0, 1]),
                u32::from_ne_bytes([0, 0, 0, 0]),
                0,
                0,
            ],
        };
        assert_eq!(device(&v6), "fd00:1::/64");
    }
}
