//! Changing a flag file safely: every change is validated as a whole file
//! before the old file is replaced (atomically, see
//! [`write_atomic`](crate::state::write_atomic)), serialised with other
//! writers through a lock file, and recorded in a change journal (who,
//! when, before, after, why) that `deploykit history` reads.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::model::{FlagSet, FlagState, SAFE_VARIANT_KEY};
use super::FlagError;

/// What a change does to one flag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FlagChangeKind {
    /// Make `variant` the default variant.
    Default {
        /// The variant.
        variant: String,
    },
    /// Enable or disable the flag.
    State {
        /// `true` for `ENABLED`.
        enabled: bool,
    },
    /// Replace the targeting rule (`None` removes it).
    Targeting {
        /// The JSONLogic rule.
        rule: Option<Value>,
    },
    /// Serve `variant` to `percent` % of targeting keys and the safe variant
    /// to the rest, through `fractional` (what a flag rollout stage writes).
    Split {
        /// The variant rolled out.
        variant: String,
        /// Its share, 0 to 100.
        percent: u8,
    },
    /// The kill switch: everyone gets the safe variant (the targeting rule
    /// is removed and the default variant set to the safe one).
    Kill,
    /// Create or replace the whole flag definition.
    Put {
        /// The flag, as flagd writes it.
        definition: Value,
    },
    /// Remove the flag.
    Remove,
}

impl FlagChangeKind {
    /// The action's name, as the journal and `history` show it.
    pub fn name(&self) -> &'static str {
        match self {
            FlagChangeKind::Default { .. } => "default",
            FlagChangeKind::State { enabled: true } => "enable",
            FlagChangeKind::State { enabled: false } => "disable",
            FlagChangeKind::Targeting { .. } => "targeting",
            FlagChangeKind::Split { .. } => "split",
            FlagChangeKind::Kill => "kill",
            FlagChangeKind::Put { .. } => "put",
            FlagChangeKind::Remove => "remove",
        }
    }
}

/// One requested change, with who asks and why.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagChange {
    /// The flag's key.
    pub flag: String,
    /// What to do.
    pub kind: FlagChangeKind,
    /// Who asks (a user name, `rollout`, `deploy <id>`).
    pub who: String,
    /// Why, if said.
    pub why: Option<String>,
}

/// One line of the change journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlagChangeRecord {
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Who.
    pub who: String,
    /// The flag.
    pub flag: String,
    /// What was asked.
    #[serde(flatten)]
    pub kind: FlagChangeKind,
    /// Why.
    pub why: Option<String>,
    /// The flag before (`null`: it did not exist).
    pub before: Value,
    /// The flag after (`null`: removed).
    pub after: Value,
}

/// A flag file and its change journal.
///
/// Cheap to clone; holds only paths.
#[derive(Debug, Clone)]
pub struct FlagStore {
    file: PathBuf,
    journal: PathBuf,
}

impl FlagStore {
    /// The flag file `file`, with its changes journaled to `journal`
    /// (a JSON-lines file, created when first needed).
    pub fn new(file: impl Into<PathBuf>, journal: impl Into<PathBuf>) -> FlagStore {
        FlagStore {
            file: file.into(),
            journal: journal.into(),
        }
    }

    /// The flag file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The change journal.
    pub fn journal(&self) -> &Path {
        &self.journal
    }

    /// Reads and parses the flag file (see [`FlagSet::parse`]).
    ///
    /// # Errors
    ///
    /// [`FlagError::Io`] when it cannot be read, and the errors of
    /// [`FlagSet::parse`].
    pub fn load(&self) -> Result<FlagSet, FlagError> {
        let text = std::fs::read_to_string(&self.file).map_err(|source| FlagError::Io {
            action: "reading the flag file",
            path: self.file.clone(),
            source,
        })?;
        FlagSet::parse(&text)
    }

    /// Applies `change`: the whole new file is validated first; on any
    /// problem nothing is written. A change that leaves the flag as it is
    /// writes nothing and journals nothing.
    ///
    /// Idempotent: applying the same change twice leaves the file as
    /// applying it once. Not cancel-safe in the middle (it blocks on file
    /// I/O); the file is replaced atomically, so a reader sees the old
    /// flags or the new ones. On failure the old file is untouched; if the
    /// journal cannot be written after the file was, the error says so and
    /// the file holds the change.
    ///
    /// # Errors
    ///
    /// [`FlagError::UnknownFlag`], [`FlagError::NoSafeVariant`],
    /// [`FlagError::BadChange`] for a change that does not fit the flag,
    /// [`FlagError::Invalid`] when the result would have problems (or the
    /// file already has some: fix them with `deploykit flags validate`),
    /// [`FlagError::Io`] for the file, the lock and the journal.
    pub fn apply(&self, change: &FlagChange) -> Result<Option<FlagChangeRecord>, FlagError> {
        let _lock = self.lock()?;
        let current = self.load()?;
        current.validate()?;
        let Value::Object(mut doc) = current.document().clone() else {
            unreachable!("a parsed flag file is an object")
        };
        let flags = doc
            .get_mut("flags")
            .and_then(Value::as_object_mut)
            .expect("a parsed flag file has a flags object");
        let before = flags.get(&change.flag).cloned().unwrap_or(Value::Null);
        let after = changed(&change.flag, &before, &change.kind, &current)?;
        if after == before {
            return Ok(None);
        }
        match &after {
            Value::Null => flags.remove(&change.flag),
            v => flags.insert(change.flag.clone(), v.clone()),
        };
        let doc = Value::Object(doc);
        FlagSet::from_value(doc.clone())?.validate()?;
        let mut text = serde_json::to_string_pretty(&doc).expect("JSON values serialise");
        text.push('\n');
        crate::state::write_atomic(&self.file, text.as_bytes()).map_err(|source| FlagError::Io {
            action: "writing the flag file",
            path: self.file.clone(),
            source,
        })?;
        let record = FlagChangeRecord {
            at_ms: crate::state::now_ms(),
            who: change.who.clone(),
            flag: change.flag.clone(),
            kind: change.kind.clone(),
            why: change.why.clone(),
            before,
            after,
        };
        self.append(&record)?;
        Ok(Some(record))
    }

    /// Every journaled change, oldest first. A torn last line (a crash
    /// while appending) is skipped.
    ///
    /// # Errors
    ///
    /// [`FlagError::Io`] when the journal exists but cannot be read or has
    /// a corrupt line before the last.
    pub fn history(&self) -> Result<Vec<FlagChangeRecord>, FlagError> {
        let file = match File::open(&self.journal) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(FlagError::Io {
                    action: "reading the flag journal",
                    path: self.journal.clone(),
                    source,
                })
            }
        };
        let io = |source| FlagError::Io {
            action: "reading the flag journal",
            path: self.journal.clone(),
            source,
        };
        let lines: Vec<String> = BufReader::new(file)
            .lines()
            .collect::<std::io::Result<_>>()
            .map_err(io)?;
        let last = lines.len().saturating_sub(1);
        let mut out = Vec::new();
        for (n, line) in lines.iter().enumerate() {
            match serde_json::from_str(line) {
                Ok(r) => out.push(r),
                Err(_) if n == last || line.trim().is_empty() => {}
                Err(e) => {
                    return Err(io(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("line {}: {e}", n + 1),
                    )))
                }
            }
        }
        Ok(out)
    }

    fn lock(&self) -> Result<File, FlagError> {
        let mut name = self.file.file_name().unwrap_or_default().to_owned();
        name.push(".lock");
        let path = self.file.with_file_name(name);
        let io = |source| FlagError::Io {
            action: "locking the flag file",
            path: path.clone(),
            source,
        };
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        f.lock().map_err(io)?;
        Ok(f)
    }

    fn append(&self, record: &FlagChangeRecord) -> Result<(), FlagError> {
        let io = |source| FlagError::Io {
            action: "journaling the flag change to",
            path: self.journal.clone(),
            source,
        };
        if let Some(dir) = self.journal.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut line = serde_json::to_vec(record).expect("records serialise");
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.journal)
            .map_err(io)?;
        // One write of the whole line, then fsync: a crash leaves at most a
        // torn last line, which the reader skips.
        f.write_all(&line).map_err(io)?;
        f.sync_data().map_err(io)
    }
}

/// The flag after `kind`, from `before` (`null` when absent).
fn changed(key: &str, before: &Value, kind: &FlagChangeKind, set: &FlagSet) -> Result<Value, FlagError> {
    let bad = |message: String| FlagError::BadChange {
        key: key.to_owned(),
        message,
    };
    if let FlagChangeKind::Put { definition } = kind {
        if !definition.is_object() {
            return Err(bad("a flag definition is a JSON object (state, variants, defaultVariant …); use a removal to delete a flag".into()));
        }
        return Ok(definition.clone());
    }
    let (Value::Object(obj), Some(flag)) = (before, set.get(key)) else {
        return Err(FlagError::UnknownFlag { key: key.to_owned() });
    };
    let mut obj: Map<String, Value> = obj.clone();
    let known = |v: &str| -> Result<(), FlagError> {
        if flag.variants().contains_key(v) {
            Ok(())
        } else {
            let names: Vec<&str> = flag.variants().keys().map(String::as_str).collect();
            Err(bad(format!(
                "`{v}` is not a variant; the variants are {}",
                names.join(", ")
            )))
        }
    };
    match kind {
        FlagChangeKind::Put { .. } => unreachable!("handled above"),
        FlagChangeKind::Remove => return Ok(Value::Null),
        FlagChangeKind::Default { variant } => {
            known(variant)?;
            obj.insert("defaultVariant".into(), Value::String(variant.clone()));
        }
        FlagChangeKind::State { enabled } => {
            let state = if *enabled {
                FlagState::Enabled
            } else {
                FlagState::Disabled
            };
            obj.insert(
                "state".into(),
                serde_json::to_value(state).expect("states serialise"),
            );
        }
        FlagChangeKind::Targeting { rule: None } => {
            obj.remove("targeting");
        }
        FlagChangeKind::Targeting { rule: Some(rule) } => {
            obj.insert("targeting".into(), rule.clone());
        }
        FlagChangeKind::Split { variant, percent } => {
            known(variant)?;
            if *percent > 100 {
                return Err(bad(format!("a split of {percent} %: use 0 to 100")));
            }
            let safe = flag
                .safe_variant()
                .ok_or_else(|| FlagError::NoSafeVariant { key: key.to_owned() })?;
            if safe == variant {
                return Err(bad(format!(
                    "`{variant}` is the safe variant; roll out another one, or set `metadata.{SAFE_VARIANT_KEY}`"
                )));
            }
            obj.insert(
                "targeting".into(),
                serde_json::json!({ "fractional": [[variant, percent], [safe, 100 - percent]] }),
            );
        }
        FlagChangeKind::Kill => {
            let safe = flag
                .safe_variant()
                .ok_or_else(|| FlagError::NoSafeVariant { key: key.to_owned() })?;
            obj.insert("defaultVariant".into(), Value::String(safe.to_owned()));
            obj.insert("state".into(), Value::String("ENABLED".into()));
            obj.remove("targeting");
        }
    }
    Ok(Value::Object(obj))
}
