//! The rules a request's fields obey: keys, values, TTLs, scan pages and
//! cursors.

use std::time::Duration;

use base64::Engine;

use crate::backend::Op;
use crate::error::ApiError;
use crate::settings::NamespaceSettings;

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Scan page size when the request says 0.
pub const DEFAULT_SCAN_LIMIT: usize = 100;
/// Largest scan page.
pub const MAX_SCAN_LIMIT: usize = 1000;
/// The longest TTL a Put may ask for: 100 years, the same on every backend.
pub use crate::backend::toolkit::MAX_TTL;

/// Checks a key: 1..=1024 bytes of UTF-8 (guaranteed by the `String`)
/// without NUL.
pub fn key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::InvalidArgument("key must not be empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::InvalidArgument(format!(
            "key is {} bytes, the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    if key.contains('\0') {
        return Err(ApiError::InvalidArgument("key must not contain NUL".into()));
    }
    Ok(())
}

/// The largest value a namespace accepts, and the one rule that checks a
/// size against it (for a value in hand, or a body not read yet).
#[derive(Debug, Clone)]
pub struct ValueLimit {
    namespace: std::sync::Arc<str>,
    max: usize,
}

impl ValueLimit {
    pub(super) fn new(namespace: std::sync::Arc<str>, settings: &NamespaceSettings) -> Self {
        ValueLimit {
            namespace,
            max: settings.max_value_size,
        }
    }

    /// The limit in bytes.
    pub fn max(&self) -> usize {
        self.max
    }

    /// `ValueTooLarge` when `size` bytes exceed the limit.
    pub fn check(&self, size: usize) -> Result<(), ApiError> {
        if size > self.max {
            return Err(ApiError::ValueTooLarge(format!(
                "value is {size} bytes, the limit of namespace '{}' is {} (max_value_size)",
                self.namespace, self.max
            )));
        }
        Ok(())
    }
}

/// The TTL a Put stores: `ttl_ms`, or the namespace default when 0; at
/// most [`MAX_TTL`].
pub fn put_ttl(settings: &NamespaceSettings, ttl_ms: u64) -> Result<Option<Duration>, ApiError> {
    if ttl_ms == 0 {
        return Ok(settings.default_ttl);
    }
    let ttl = Duration::from_millis(ttl_ms);
    if ttl > MAX_TTL {
        return Err(ApiError::InvalidArgument(format!(
            "ttl_ms is {ttl_ms}, the limit is {} (100 years)",
            MAX_TTL.as_millis()
        )));
    }
    Ok(Some(ttl))
}

/// A scan request's fields, as every transport receives them.
#[derive(Debug, Clone, Default)]
pub struct ScanParams {
    /// Keys that start with this; empty for every key.
    pub prefix: String,
    /// Page size: 0 for the default (100), at most 1000.
    pub limit: u32,
    /// A `next_cursor` of an earlier page, or empty.
    pub cursor: String,
    /// Leave values out.
    pub keys_only: bool,
}

/// Builds a scan operation from request fields, with the page byte budget
/// of its namespace (`max_page_bytes`).
pub fn scan_op(p: ScanParams, settings: &NamespaceSettings) -> Result<Op, ApiError> {
    if p.prefix.len() > MAX_KEY_BYTES {
        return Err(ApiError::InvalidArgument(format!(
            "prefix is {} bytes, the limit is {MAX_KEY_BYTES}",
            p.prefix.len()
        )));
    }
    if p.prefix.contains('\0') {
        return Err(ApiError::InvalidArgument(
            "prefix must not contain NUL".into(),
        ));
    }
    let limit = match p.limit as usize {
        0 => DEFAULT_SCAN_LIMIT,
        n => n.min(MAX_SCAN_LIMIT),
    };
    let after = if p.cursor.is_empty() {
        None
    } else {
        Some(decode_cursor(&p.cursor)?)
    };
    Ok(Op::Scan {
        prefix: p.prefix,
        after,
        limit,
        max_bytes: settings.max_page_bytes,
        keys_only: p.keys_only,
    })
}

/// Cursors are the last key returned, base64url-encoded, so that they are
/// opaque to clients and safe in URLs.
pub fn encode_cursor(last_key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last_key.as_bytes())
}

/// The key a cursor continues after. A cursor is only ever the encoding of
/// a key a scan returned, so it must decode to a valid key; anything else
/// is forged or damaged and never reaches a backend.
fn decode_cursor(cursor: &str) -> Result<String, ApiError> {
    let bad = |why: &str| {
        ApiError::InvalidArgument(format!(
            "bad cursor: {why}; pass the next_cursor of an earlier scan, or empty to start"
        ))
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad("not base64url"))?;
    let last = String::from_utf8(bytes).map_err(|_| bad("does not decode to UTF-8"))?;
    key(&last).map_err(|e| bad(&format!("does not decode to a valid key ({e})")))?;
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace() -> NamespaceSettings {
        let settings = crate::settings::Settings::from_toml(
            "[server]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n\
             [backends.m]\nkind = \"memory\"\n[namespaces.n]\nbackend = \"m\"\n",
        )
        .unwrap();
        settings.namespaces["n"].clone()
    }

    fn scan_op(p: ScanParams) -> Result<Op, ApiError> {
        super::scan_op(p, &namespace())
    }

    fn params(limit: u32, cursor: &str) -> ScanParams {
        ScanParams {
            limit,
            cursor: cursor.into(),
            ..ScanParams::default()
        }
    }

    #[test]
    fn keys_are_validated() {
        assert!(key("a").is_ok());
        assert!(key(&"k".repeat(1024)).is_ok());
        assert!(key("").is_err());
        assert!(key(&"k".repeat(1025)).is_err());
        assert!(key("a\0b").is_err());
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_rejected() {
        let c = encode_cursor("user/ü/42");
        let Op::Scan { after, limit, .. } = scan_op(params(0, &c)).unwrap() else {
            panic!("not a scan");
        };
        assert_eq!(after.as_deref(), Some("user/ü/42"));
        assert_eq!(limit, DEFAULT_SCAN_LIMIT);
        assert!(scan_op(params(5000, ""))
            .is_ok_and(|op| matches!(op, Op::Scan { limit, .. } if limit == MAX_SCAN_LIMIT)));
        assert!(scan_op(params(1, "!!not base64!!")).is_err());
    }

    #[test]
    fn cursors_must_decode_to_valid_keys() {
        for forged in ["", "a\0b"] {
            let c = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged);
            let cursor = if c.is_empty() { "=".to_owned() } else { c };
            let e = scan_op(params(1, &cursor)).unwrap_err();
            assert!(e.to_string().starts_with("bad cursor"), "{e}");
        }
        let long = encode_cursor(&"k".repeat(MAX_KEY_BYTES + 1));
        let e = scan_op(params(1, &long)).unwrap_err();
        assert!(e.to_string().contains("1025 bytes"), "{e}");
    }

    #[test]
    fn ttls_are_bounded_by_one_limit() {
        let ns = &namespace();
        let max = MAX_TTL.as_millis() as u64;
        assert_eq!(put_ttl(ns, max).unwrap(), Some(MAX_TTL));
        let e = put_ttl(ns, max + 1).unwrap_err();
        assert!(e.to_string().contains("ttl_ms") && e.to_string().contains(&max.to_string()));
        assert!(put_ttl(ns, u64::MAX).is_err());
    }
}
