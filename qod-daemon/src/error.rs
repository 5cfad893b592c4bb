//! The API's error model: every failure a caller can see is a [`CamaraError`], mapped once to a
//! gRPC status carrying a `google.rpc.ErrorInfo` whose reason is the CAMARA error code.

use std::fmt;

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt as _};

/// `google.rpc.ErrorInfo.domain` of every qod error.
pub const ERROR_DOMAIN: &str = "qod.camara";

/// CAMARA error codes (the `code` of CAMARA's `ErrorInfo`), with the gRPC code each maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CamaraCode {
    InvalidArgument,
    OutOfRange,
    DurationOutOfRange,
    InvalidSink,
    InvalidCredential,
    InvalidToken,
    NotFound,
    IdentifierNotFound,
    Conflict,
    SessionExtensionNotAllowed,
    ServiceNotApplicable,
    MissingIdentifier,
    UnsupportedIdentifier,
    UnnecessaryIdentifier,
    QosProfileNotApplicable,
    Unauthenticated,
    PermissionDenied,
    QuotaExceeded,
    TooManyRequests,
    NotImplemented,
    Internal,
    Unavailable,
}

impl CamaraCode {
    pub const ALL: [Self; 22] = [
        Self::InvalidArgument,
        Self::OutOfRange,
        Self::DurationOutOfRange,
        Self::InvalidSink,
        Self::InvalidCredential,
        Self::InvalidToken,
        Self::NotFound,
        Self::IdentifierNotFound,
        Self::Conflict,
        Self::SessionExtensionNotAllowed,
        Self::ServiceNotApplicable,
        Self::MissingIdentifier,
        Self::UnsupportedIdentifier,
        Self::UnnecessaryIdentifier,
        Self::QosProfileNotApplicable,
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::QuotaExceeded,
        Self::TooManyRequests,
        Self::NotImplemented,
        Self::Internal,
        Self::Unavailable,
    ];

    /// The code whose [`CamaraCode::reason`] is `reason`.
    pub fn from_reason(reason: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.reason() == reason)
    }

    /// The CAMARA code string, carried as `ErrorInfo.reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::OutOfRange => "OUT_OF_RANGE",
            Self::DurationOutOfRange => "QUALITY_ON_DEMAND.DURATION_OUT_OF_RANGE",
            Self::InvalidSink => "INVALID_SINK",
            Self::InvalidCredential => "INVALID_CREDENTIAL",
            Self::InvalidToken => "INVALID_TOKEN",
            Self::NotFound => "NOT_FOUND",
            Self::IdentifierNotFound => "IDENTIFIER_NOT_FOUND",
            Self::Conflict => "CONFLICT",
            Self::SessionExtensionNotAllowed => "QUALITY_ON_DEMAND.SESSION_EXTENSION_NOT_ALLOWED",
            Self::ServiceNotApplicable => "SERVICE_NOT_APPLICABLE",
            Self::MissingIdentifier => "MISSING_IDENTIFIER",
            Self::UnsupportedIdentifier => "UNSUPPORTED_IDENTIFIER",
            Self::UnnecessaryIdentifier => "UNNECESSARY_IDENTIFIER",
            Self::QosProfileNotApplicable => "QUALITY_ON_DEMAND.QOS_PROFILE_NOT_APPLICABLE",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::QuotaExceeded => "QUOTA_EXCEEDED",
            Self::TooManyRequests => "TOO_MANY_REQUESTS",
            Self::NotImplemented => "NOT_IMPLEMENTED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
        }
    }

    /// The gRPC status code: CAMARA's HTTP status translated (400 → INVALID_ARGUMENT or
    /// OUT_OF_RANGE, 404 → NOT_FOUND, 409 → ALREADY_EXISTS / FAILED_PRECONDITION, 422 →
    /// FAILED_PRECONDITION, 401, 403, 429 → RESOURCE_EXHAUSTED).
    pub fn grpc_code(self) -> Code {
        match self {
            Self::InvalidArgument
            | Self::InvalidSink
            | Self::InvalidCredential
            | Self::InvalidToken => Code::InvalidArgument,
            Self::OutOfRange | Self::DurationOutOfRange => Code::OutOfRange,
            Self::NotFound | Self::IdentifierNotFound => Code::NotFound,
            Self::Conflict => Code::AlreadyExists,
            Self::SessionExtensionNotAllowed
            | Self::ServiceNotApplicable
            | Self::MissingIdentifier
            | Self::UnsupportedIdentifier
            | Self::UnnecessaryIdentifier
            | Self::QosProfileNotApplicable => Code::FailedPrecondition,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::QuotaExceeded | Self::TooManyRequests => Code::ResourceExhausted,
            Self::NotImplemented => Code::Unimplemented,
            Self::Internal => Code::Internal,
            Self::Unavailable => Code::Unavailable,
        }
    }
}

impl CamaraCode {
    /// The HTTP status CAMARA's OpenAPI gives the code (the REST edge).
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidArgument
            | Self::OutOfRange
            | Self::DurationOutOfRange
            | Self::InvalidSink
            | Self::InvalidCredential
            | Self::InvalidToken => 400,
            Self::Unauthenticated => 401,
            Self::PermissionDenied => 403,
            Self::NotFound | Self::IdentifierNotFound => 404,
            Self::Conflict | Self::SessionExtensionNotAllowed => 409,
            Self::ServiceNotApplicable
            | Self::MissingIdentifier
            | Self::UnsupportedIdentifier
            | Self::UnnecessaryIdentifier
            | Self::QosProfileNotApplicable => 422,
            Self::QuotaExceeded | Self::TooManyRequests => 429,
            Self::Internal => 500,
            Self::NotImplemented => 501,
            Self::Unavailable => 503,
        }
    }
}

impl fmt::Display for CamaraCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// A failure reported to an API caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct CamaraError {
    pub code: CamaraCode,
    /// What a person can act on; names the offending field and value.
    pub message: String,
    /// Request field path the error is about (`ErrorInfo.metadata["field"]`), when there is one.
    pub field: Option<String>,
}

impl CamaraError {
    pub fn new(code: CamaraCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }

    /// An error about one request field.
    pub fn field(code: CamaraCode, field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        Self {
            code,
            message: format!("{field}: {}", message.into()),
            field: Some(field),
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::field(CamaraCode::InvalidArgument, field, message)
    }
}

/// Longest error message sent (bytes): it travels twice in the trailers (`grpc-message` and
/// the details), which standard clients cap at 16 KiB in all.
pub const MAX_MESSAGE_BYTES: usize = 512;
/// Longest `field` path sent.
pub const MAX_FIELD_BYTES: usize = 128;

/// `text` as an error may echo it: control characters (which the trailers would escape, and
/// which may forge log lines) as `?`, cut at a character boundary to `max` bytes with `…`.
pub fn sanitized(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let c = if c.is_control() { '?' } else { c };
        if out.len() + c.len_utf8() > max.saturating_sub('…'.len_utf8()) {
            out.push('…');
            return out;
        }
        out.push(c);
    }
    out
}

impl CamaraError {
    /// The error another qodd answered with (a cluster peer a call was passed on to), as it
    /// would have answered here: its code (`ErrorInfo.reason`), message and field.
    pub fn from_status(status: &tonic::Status) -> Self {
        let info = status.get_details_error_info();
        let code = info
            .as_ref()
            .and_then(|i| CamaraCode::from_reason(&i.reason))
            .unwrap_or(match status.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                    CamaraCode::Unavailable
                }
                _ => CamaraCode::Internal,
            });
        Self {
            code,
            message: status.message().to_owned(),
            field: info.and_then(|i| i.metadata.get("field").cloned()),
        }
    }
}

impl From<CamaraError> for tonic::Status {
    fn from(e: CamaraError) -> Self {
        let mut metadata = std::collections::HashMap::new();
        if let Some(field) = &e.field {
            metadata.insert("field".to_owned(), sanitized(field, MAX_FIELD_BYTES));
        }
        let details = ErrorDetails::with_error_info(e.code.reason(), ERROR_DOMAIN, metadata);
        tonic::Status::with_error_details(
            e.code.grpc_code(),
            sanitized(&e.message, MAX_MESSAGE_BYTES),
            details,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_are_capped_and_control_characters_replaced() {
        let long: tonic::Status = CamaraError::invalid(
            "sessionId",
            format!("not a session id: {}", "é".repeat(30_000)),
        )
        .into();
        assert!(
            long.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            long.message().len()
        );
        assert!(long.message().ends_with('…'));
        assert!(
            long.message()
                .starts_with("sessionId: not a session id: éé")
        );
        let forged: tonic::Status =
            CamaraError::invalid("x", "line\r\nlevel=ERROR fake\u{7}").into();
        assert_eq!(forged.message(), "x: line??level=ERROR fake?");
        assert_eq!(sanitized("short", 512), "short");
    }

    #[test]
    fn a_peers_status_reads_back_as_the_same_error() {
        for code in CamaraCode::ALL {
            let e = CamaraError::field(code, "device", "why");
            assert_eq!(CamaraError::from_status(&e.clone().into()), e);
        }
        let bare = tonic::Status::unavailable("peer gone");
        assert_eq!(
            CamaraError::from_status(&bare).code,
            CamaraCode::Unavailable
        );
    }

    #[test]
    fn status_carries_reason_and_field() {
        let status: tonic::Status =
            CamaraError::field(CamaraCode::DurationOutOfRange, "duration", "too long").into();
        assert_eq!(status.code(), Code::OutOfRange);
        assert_eq!(status.message(), "duration: too long");
        let info = status
            .get_details_error_info()
            .expect("error info attached");
        assert_eq!(info.reason, "QUALITY_ON_DEMAND.DURATION_OUT_OF_RANGE");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(
            info.metadata.get("field").map(String::as_str),
            Some("duration")
        );
    }
}
