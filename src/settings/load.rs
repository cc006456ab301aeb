//! Loading: layering files and environment variables with the `config` crate,
//! and turning its errors into ones that name the key and its origin.

use std::path::{Path, PathBuf};

use config::{Config, ConfigError, Environment, FileFormat, Value, ValueKind};

use super::error::Error;
use super::raw::RawSettings;
use super::{is_valid_name, Settings, DEFAULT_FILE, ENV_NAME_VAR, ENV_PREFIX, ENV_SEPARATOR};

/// The files that make up the settings in `dir` for environment `env_name`,
/// in the order they are layered: `default.toml`, then `<env_name>.toml` if
/// it exists. `default.toml` is listed whether or not it exists.
pub fn files(dir: &Path, env_name: Option<&str>) -> Result<Vec<PathBuf>, Error> {
    let mut files = vec![dir.join(DEFAULT_FILE)];
    if let Some(name) = env_name.filter(|n| !n.is_empty()) {
        // The name becomes part of a path: keep it to one plain file name.
        if !is_valid_name(name) {
            return Err(Error::Env {
                name: ENV_NAME_VAR.into(),
                message: format!(
                    "{name:?} is not a valid environment name (letters, digits, `_`, `-`)"
                ),
            });
        }
        let file = dir.join(format!("{name}.toml"));
        if file.is_file() {
            files.push(file);
        }
    }
    Ok(files)
}

/// Loads and validates the settings in `dir` from the process environment:
/// `PRISM_ENV` names the environment layer and `PRISM__<SECTION>__<KEY>`
/// variables override single keys.
pub fn load(dir: &Path) -> Result<Settings, Error> {
    let env_name = std::env::var(ENV_NAME_VAR).ok();
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Ok(name) = name.into_string() else {
            continue;
        };
        if !is_override_var(&name) {
            continue;
        }
        match value.into_string() {
            Ok(value) => vars.push((name, value)),
            Err(_) => {
                return Err(Error::Env {
                    name,
                    message: "value is not valid UTF-8".into(),
                })
            }
        }
    }
    load_with(dir, env_name.as_deref(), vars)
}

/// [`load`] with the environment passed in, so tests need not touch the
/// process environment: `env_name` stands for `PRISM_ENV`, `env_vars` for the
/// process's variables (those without the `PRISM__` prefix are ignored).
///
/// Layers, later ones winning key by key: `<dir>/default.toml` (required),
/// `<dir>/<env_name>.toml` (if it exists), then the `PRISM__` variables.
/// Variable names are matched case-insensitively and their key segments are
/// lowercased, so they address lowercase names only. Values that look like
/// numbers or booleans are parsed as such.
pub fn load_with<I>(dir: &Path, env_name: Option<&str>, env_vars: I) -> Result<Settings, Error>
where
    I: IntoIterator<Item = (String, String)>,
{
    Loader::new().load_with(dir, env_name, env_vars)
}

/// Loads settings that may name backend kinds registered by the embedding
/// program besides the built-in ones.
#[derive(Debug, Clone, Default)]
pub struct Loader {
    kinds: Vec<String>,
}

impl Loader {
    /// A loader that knows the built-in backend kinds only.
    pub fn new() -> Self {
        Loader::default()
    }

    /// Accepts backends of kind `name` too; their own keys are read by the
    /// program's connector factory (`CustomSettings::options`).
    pub fn kind(mut self, name: impl Into<String>) -> Self {
        self.kinds.push(name.into());
        self
    }

    /// Settings from one TOML text.
    pub fn from_toml(&self, toml: &str) -> Result<Settings, Error> {
        let builder = Config::builder().add_source(config::File::from_str(toml, FileFormat::Toml));
        self.build(builder, &[])
    }

    /// [`load_with`], knowing this loader's kinds.
    pub fn load_with<I>(
        &self,
        dir: &Path,
        env_name: Option<&str>,
        env_vars: I,
    ) -> Result<Settings, Error>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        if dir.is_file() {
            return Err(Error::NotADirectory {
                path: dir.display().to_string(),
                file: DEFAULT_FILE,
            });
        }
        let files = files(dir, env_name)?;
        let mut builder = Config::builder();
        for file in &files {
            check_readable(file)?;
            builder = builder.add_source(
                config::File::from(file.as_path())
                    .format(FileFormat::Toml)
                    .required(true),
            );
        }
        let vars: config::Map<String, String> = env_vars
            .into_iter()
            .filter(|(name, _)| is_override_var(name))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .try_parsing(true)
                .ignore_empty(true)
                .source(Some(vars)),
        );
        let layers: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        self.build(builder, &layers)
    }

    /// Builds the layers into settings; `layers` names the files read, for
    /// an error about a key that none of them has.
    fn build(
        &self,
        builder: config::ConfigBuilder<config::builder::DefaultState>,
        layers: &[String],
    ) -> Result<Settings, Error> {
        let config = builder.build().map_err(|e| from_config(e, None))?;
        let root = config.cache.clone();
        let raw: RawSettings = config.try_deserialize().map_err(|e| {
            from_config(e, Some(&root))
                .locate(&root)
                .in_layers(layers, &root)
        })?;
        raw.validate(&root, &self.kinds)
            .map_err(|e| e.locate(&root).in_layers(layers, &root))
    }
}

/// Checks that `file` is a regular file this process can read. Checked
/// here rather than left to `config`, whose messages do not say which
/// directory it looked in, that a folder is no file, or which file it could
/// not open.
fn check_readable(file: &Path) -> Result<(), Error> {
    let read_error = |reason: String| Error::Read {
        path: file.display().to_string(),
        reason,
    };
    match std::fs::metadata(file) {
        Err(e) => return Err(read_error(e.to_string())),
        Ok(m) if m.is_dir() => return Err(read_error("it is a directory, not a file".into())),
        Ok(m) if !m.is_file() => return Err(read_error("not a regular file".into())),
        Ok(_) => {}
    }
    // Opening is what fails for a file without read permission.
    std::fs::File::open(file)
        .map(drop)
        .map_err(|e| read_error(e.to_string()))
}

fn is_override_var(name: &str) -> bool {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    name.len() > prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(&prefix)
}

/// Where a value came from. Tables built while merging layers may carry no
/// origin of their own; then the first of their values that has one tells.
pub(super) fn origin_of(value: &Value) -> Option<String> {
    if let Some(origin) = value.origin() {
        return Some(origin.to_owned());
    }
    match &value.kind {
        ValueKind::Table(table) => {
            let mut keys: Vec<&String> = table.keys().collect();
            keys.sort();
            keys.into_iter().find_map(|k| origin_of(&table[k]))
        }
        ValueKind::Array(values) => values.iter().find_map(origin_of),
        _ => None,
    }
}

/// The value at a dotted path of the loaded tree.
pub(super) fn lookup<'a>(root: &'a Value, key: &str) -> Option<&'a Value> {
    let mut value = root;
    for segment in key.split('.') {
        match &value.kind {
            ValueKind::Table(table) => value = table.get(segment)?,
            _ => return None,
        }
    }
    Some(value)
}

fn scalar(value: &Value) -> Option<String> {
    Some(match &value.kind {
        ValueKind::String(s) => format!("{s:?}"),
        ValueKind::Boolean(b) => b.to_string(),
        ValueKind::I64(n) => n.to_string(),
        ValueKind::I128(n) => n.to_string(),
        ValueKind::U64(n) => n.to_string(),
        ValueKind::U128(n) => n.to_string(),
        ValueKind::Float(n) => n.to_string(),
        ValueKind::Nil | ValueKind::Table(_) | ValueKind::Array(_) => return None,
    })
}

fn join_key(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_owned()
    } else {
        format!("{parent}.{child}")
    }
}

/// Turns a `config` error into one that names the key and its origin.
///
/// `config` reports the path of the value that failed to deserialize, but
/// not the name of an unknown key (serde reports that inside a message, at
/// the parent's path), and no origin for messages from serde or
/// `humantime_serde`. Both are recovered here from the value tree.
pub(super) fn from_config(error: ConfigError, root: Option<&Value>) -> Error {
    let origin_at = |key: &str| root.and_then(|r| lookup(r, key)).and_then(origin_of);
    match error {
        ConfigError::FileParse { uri, cause } => Error::Syntax {
            path: uri.unwrap_or_else(|| "(unknown file)".into()),
            message: cause.to_string().trim_end().to_owned(),
        },
        ConfigError::NotFound(key) => Error::missing(key),
        ConfigError::Type {
            origin,
            unexpected,
            expected,
            key,
        } => {
            let key = key.unwrap_or_default();
            Error::BadValue {
                origin: origin.or_else(|| origin_at(&key)),
                message: format!("invalid type: {unexpected}, expected {expected}"),
                key,
            }
        }
        ConfigError::At { error, origin, key } => {
            let key = key.unwrap_or_default();
            match *error {
                ConfigError::Message(message) => from_message(&message, key, origin, root),
                other => Error::BadValue {
                    origin: origin.or_else(|| origin_at(&key)),
                    message: other.to_string(),
                    key,
                },
            }
        }
        ConfigError::Message(message) => from_message(&message, String::new(), None, root),
        other => Error::BadValue {
            key: String::new(),
            origin: None,
            message: other.to_string(),
        },
    }
}

/// Classifies a serde message raised at `key`.
fn from_message(message: &str, key: String, origin: Option<String>, root: Option<&Value>) -> Error {
    // serde: "unknown field `foo`, expected one of `a`, `b`" (or "expected `a`",
    // "expected `a` or `b`", "there are no fields"), raised at the parent's path.
    if message.starts_with("unknown field `") {
        let mut quoted = message.split('`').skip(1).step_by(2).map(str::to_owned);
        let field = quoted.next().unwrap_or_default();
        let key = join_key(&key, &field);
        return Error::UnknownKey {
            origin: origin.or_else(|| root.and_then(|r| lookup(r, &key)).and_then(origin_of)),
            expected: quoted.collect(),
            key,
        };
    }
    let raw = root.and_then(|r| lookup(r, &key));
    let origin = origin.or_else(|| raw.and_then(origin_of));
    let message = match raw.map(|v| &v.kind) {
        // humantime_serde only says "expected a duration"; humantime says why.
        Some(ValueKind::String(s)) if message.ends_with("expected a duration") => {
            match humantime::parse_duration(s) {
                Err(e) => format!("invalid duration {s:?}: {e}"),
                Ok(_) => message.to_owned(),
            }
        }
        Some(ValueKind::I64(_) | ValueKind::U64(_) | ValueKind::Float(_))
            if message.ends_with("expected a duration") =>
        {
            format!(
                "invalid duration {}: a duration needs a unit, such as \"5s\" or \"500ms\"",
                raw.and_then(scalar).unwrap_or_default()
            )
        }
        _ if message == "invalid socket address syntax" => format!(
            "invalid address {}: expected ip:port, such as 127.0.0.1:8980",
            raw.and_then(scalar).unwrap_or_default()
        ),
        _ => message.to_owned(),
    };
    Error::BadValue {
        key,
        origin,
        message,
    }
}
