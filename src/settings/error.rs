//! Errors of loading and validating settings: every one names its key (as a
//! dotted path) and, when known, the file or environment variable it came
//! from.

use config::Value;

use super::load::{lookup, origin_of};
use super::{ENV_PREFIX, ENV_SEPARATOR};

/// What the `config` crate records as the origin of an environment value.
pub(super) const ENV_ORIGIN: &str = "the environment";

/// Errors of loading or validating settings. Every variant about a value
/// names its key as a dotted path (`namespaces.default.backend`) and, when
/// known, where the value came from (a file, or an environment variable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A settings file that must be read could not be.
    #[error("cannot read settings file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A settings file is not valid TOML.
    #[error("settings file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key that no setting has: a typo, or a key in the wrong section.
    #[error("unknown settings key `{key}`{}{}", at(.key, .origin.as_deref()), expected_hint(.expected))]
    UnknownKey {
        /// The dotted path of the key.
        key: String,
        /// The file or environment the key came from.
        origin: Option<String>,
        /// The keys allowed where this one was found.
        expected: Vec<String>,
    },
    /// A required key is absent from every layer.
    #[error("missing settings key `{key}`")]
    Missing {
        /// The dotted path of the key.
        key: String,
    },
    /// A value that does not parse as its key's type: a bad duration,
    /// address, number or enum name.
    #[error("bad value for settings key `{key}`{}: {message}", at(.key, .origin.as_deref()))]
    BadValue {
        /// The dotted path of the key.
        key: String,
        /// The file or environment the value came from.
        origin: Option<String>,
        /// What is wrong with it.
        message: String,
    },
    /// A value that parses but breaks a rule: out of range, names a backend
    /// that does not exist, belongs to another backend kind.
    #[error("invalid settings key `{key}`{}: {message}", at(.key, .origin.as_deref()))]
    Invalid {
        /// The dotted path of the key.
        key: String,
        /// The file or environment the value came from.
        origin: Option<String>,
        /// The rule it breaks.
        message: String,
    },
    /// An environment variable that steers loading is unusable.
    #[error("environment variable {name}: {message}")]
    Env {
        /// The variable.
        name: String,
        /// What is wrong with it.
        message: String,
    },
}

impl Error {
    /// The dotted path of the offending key, when the error is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Error::UnknownKey { key, .. }
            | Error::Missing { key }
            | Error::BadValue { key, .. }
            | Error::Invalid { key, .. } => Some(key),
            Error::Env { name, .. } => Some(name),
            Error::Read { .. } | Error::Syntax { .. } => None,
        }
    }

    /// Where the offending value came from: a file path, or `the environment`.
    pub fn origin(&self) -> Option<&str> {
        match self {
            Error::UnknownKey { origin, .. }
            | Error::BadValue { origin, .. }
            | Error::Invalid { origin, .. } => origin.as_deref(),
            Error::Read { path, .. } | Error::Syntax { path, .. } => Some(path),
            Error::Missing { .. } | Error::Env { .. } => None,
        }
    }

    /// A value that parses but breaks a rule.
    pub(super) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            key: key.into(),
            origin: None,
            message: message.into(),
        }
    }

    /// A value that does not parse as its key's type.
    pub(super) fn bad_value(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::BadValue {
            key: key.into(),
            origin: None,
            message: message.into(),
        }
    }

    /// Fills in the origin of an error from the loaded value tree.
    pub(super) fn locate(mut self, root: &Value) -> Self {
        if let Error::Invalid { key, origin, .. }
        | Error::BadValue { key, origin, .. }
        | Error::UnknownKey { key, origin, .. } = &mut self
        {
            if origin.is_none() {
                *origin = lookup(root, key).and_then(origin_of);
            }
        }
        self
    }

    /// An error raised inside the section at `prefix` (its keys relative to
    /// it), with its key made absolute and its origin found in `root`.
    pub(super) fn under(mut self, prefix: &str, root: &Value) -> Self {
        if let Error::Invalid { key, .. }
        | Error::BadValue { key, .. }
        | Error::UnknownKey { key, .. }
        | Error::Missing { key } = &mut self
        {
            *key = if key.is_empty() {
                prefix.to_owned()
            } else {
                format!("{prefix}.{key}")
            };
        }
        self.locate(root)
    }
}

/// ` in settings/default.toml`, or ` (environment variable PRISM__SERVER__GRPC_ADDR)`.
pub(super) fn at(key: &str, origin: Option<&str>) -> String {
    match origin {
        None => String::new(),
        Some(ENV_ORIGIN) => format!(" (environment variable {})", env_var_name(key)),
        Some(file) => format!(" in {file}"),
    }
}

fn expected_hint(expected: &[String]) -> String {
    if expected.is_empty() {
        String::new()
    } else {
        format!("; expected one of: {}", expected.join(", "))
    }
}

/// The override variable of a key: `server.grpc_addr` → `PRISM__SERVER__GRPC_ADDR`.
pub fn env_var_name(key: &str) -> String {
    let mut name = String::from(ENV_PREFIX);
    for segment in key.split('.') {
        name.push_str(ENV_SEPARATOR);
        name.push_str(&segment.to_uppercase());
    }
    name
}
