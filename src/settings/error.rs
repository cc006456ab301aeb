//! Errors of loading and validating settings: every one names its key (as a
//! dotted path) and, when known, the file or environment variable it came
//! from.

use config::{Value, ValueKind};

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
    #[error("missing settings key `{key}`{}{}", in_origin(.origin.as_deref()), with_hint(.hint.as_deref()))]
    Missing {
        /// The dotted path of the key.
        key: String,
        /// Where the key was expected: the file that defines its section,
        /// `the environment` when only variables do, or the layers that
        /// were read when no layer has the section.
        origin: Option<String>,
        /// Why the key may be missing, e.g. that its section comes only
        /// from environment variables whose name is likely misspelt.
        hint: Option<String>,
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
    /// The settings directory is not a directory.
    #[error("settings directory {path} is not a directory: `--settings` (PRISM_SETTINGS) names the directory that holds {file}")]
    NotADirectory {
        /// The path given.
        path: String,
        /// The file the directory must hold.
        file: &'static str,
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
            | Error::Missing { key, .. }
            | Error::BadValue { key, .. }
            | Error::Invalid { key, .. } => Some(key),
            Error::Env { name, .. } => Some(name),
            Error::Read { .. } | Error::Syntax { .. } | Error::NotADirectory { .. } => None,
        }
    }

    /// Where the offending value came from: a file path, or `the environment`.
    pub fn origin(&self) -> Option<&str> {
        match self {
            Error::UnknownKey { origin, .. }
            | Error::BadValue { origin, .. }
            | Error::Invalid { origin, .. }
            | Error::Missing { origin, .. } => origin.as_deref(),
            Error::Read { path, .. }
            | Error::Syntax { path, .. }
            | Error::NotADirectory { path, .. } => Some(path),
            Error::Env { .. } => None,
        }
    }

    /// A required key that no layer sets.
    pub(super) fn missing(key: impl Into<String>) -> Self {
        Error::Missing {
            key: key.into(),
            origin: None,
            hint: None,
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
        match &mut self {
            Error::Invalid { key, origin, .. }
            | Error::BadValue { key, origin, .. }
            | Error::UnknownKey { key, origin, .. }
                if origin.is_none() =>
            {
                *origin = lookup(root, key).and_then(origin_of);
            }
            Error::Missing { key, origin, hint } if origin.is_none() => {
                (*origin, *hint) = expected_at(key, root);
            }
            _ => {}
        }
        self
    }

    /// Names the layers that were read as the origin of a missing key
    /// whose section no layer has (a key of the top level, or an empty
    /// file), and says when they set no key at all.
    pub(super) fn in_layers(mut self, layers: &[String], root: &Value) -> Self {
        if let Error::Missing { origin, hint, .. } = &mut self {
            if origin.is_none() && !layers.is_empty() {
                *origin = Some(layers.join(", "));
                if hint.is_none() && leaves(root).is_empty() {
                    *hint = Some(
                        "no settings file and no PRISM__ variable sets any key; \
                         start from the repository's settings/default.toml"
                            .into(),
                    );
                }
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
        | Error::Missing { key, .. } = &mut self
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

/// ` in settings/default.toml` for a missing key; nothing for one expected
/// in the environment (its hint names the variables).
fn in_origin(origin: Option<&str>) -> String {
    match origin {
        None | Some(ENV_ORIGIN) => String::new(),
        Some(files) => format!(" in {files}"),
    }
}

fn with_hint(hint: Option<&str>) -> String {
    hint.map(|h| format!(": {h}")).unwrap_or_default()
}

/// Where a missing `key` was expected, and why it may be missing: the file
/// that defines its section; or, when only environment variables set the
/// section, those variables and a similarly named section of a file (a
/// misspelt `PRISM__NAMESPACES__ORDRES__TIMEOUT` makes a namespace `ordres`
/// that has no backend). `(None, None)` when no layer has the section.
fn expected_at(key: &str, root: &Value) -> (Option<String>, Option<String>) {
    let Some((section_key, _)) = key.rsplit_once('.') else {
        return (None, None);
    };
    let Some(section) = lookup(root, section_key) else {
        return (None, None);
    };
    let leaves = leaves(section);
    if let Some(file) = leaves
        .iter()
        .filter_map(|(_, v)| v.origin())
        .find(|o| *o != ENV_ORIGIN)
    {
        return (Some(file.to_owned()), None);
    }
    // Values of a text without a file (`Settings::from_toml`) have no
    // origin at all: nothing to tell then.
    if leaves.is_empty() || leaves.iter().any(|(_, v)| v.origin().is_none()) {
        return (section.origin().map(str::to_owned), None);
    }
    let vars: Vec<String> = leaves
        .iter()
        .map(|(k, _)| env_var_name(&format!("{section_key}.{k}")))
        .collect();
    let (plural, which) = if vars.len() == 1 {
        ("", "which overrides")
    } else {
        ("s", "which override")
    };
    let mut hint = format!(
        "`{section_key}` is set only by environment variable{plural} {}, {which} no section \
         of a settings file",
        vars.join(", ")
    );
    if let Some((file, name)) = similar_section(section_key, root) {
        hint.push_str(&format!("; did you mean `{name}` (defined in {file})?"));
    }
    (Some(ENV_ORIGIN.to_owned()), Some(hint))
}

/// The keys under `value` that hold a scalar or an array, relative to it
/// (`timeout`, `tls.cert`), each with its value, in key order.
fn leaves(value: &Value) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    if let ValueKind::Table(table) = &value.kind {
        let mut keys: Vec<&String> = table.keys().collect();
        keys.sort();
        for k in keys {
            let child = &table[k];
            if matches!(child.kind, ValueKind::Table(_)) {
                out.extend(
                    leaves(child)
                        .into_iter()
                        .map(|(sub, v)| (format!("{k}.{sub}"), v)),
                );
            } else {
                out.push((k.clone(), child));
            }
        }
    }
    out
}

/// A sibling of the section at `section_key` (`namespaces.ordres`) that a
/// file defines and whose name is at most two edits away
/// (`namespaces.orders`): its file and its dotted key.
fn similar_section(section_key: &str, root: &Value) -> Option<(String, String)> {
    let (parent_key, name) = section_key.rsplit_once('.')?;
    let ValueKind::Table(siblings) = &lookup(root, parent_key)?.kind else {
        return None;
    };
    siblings
        .iter()
        .filter(|(other, _)| other.as_str() != name)
        .filter_map(|(other, v)| {
            let file = leaves(v)
                .into_iter()
                .filter_map(|(_, leaf)| leaf.origin())
                .find(|o| *o != ENV_ORIGIN)?
                .to_owned();
            let distance = edit_distance(name, other);
            (distance <= 2).then(|| (distance, other.clone(), file))
        })
        .min()
        .map(|(_, other, file)| (file, format!("{parent_key}.{other}")))
}

/// Levenshtein distance between two short names, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
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
