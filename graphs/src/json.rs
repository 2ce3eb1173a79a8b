//! Typed reads of a diffusers config object (`config.json`, `scheduler_config.json`): each read
//! records its key, so [`Reader::finish`] can refuse keys nobody read, by name.

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

/// Parses a diffusers JSON file: Python's `json.dump` writes `Infinity`, `-Infinity` and `NaN`
/// (e.g. `lambda_min_clipped: -Infinity`), which JSON has no literal for; they are read as
/// strings here and as numbers by [`Reader`].
pub fn parse(text: &str) -> serde_json::Result<Value> {
    let mut out = String::with_capacity(text.len());
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
        } else {
            let tok = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t));
            if let Some(t) = tok {
                out.push('"');
                out.push_str(t);
                out.push('"');
                rest = &rest[t.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out)
}

/// A number, or one of Python's non-finite literals as [`parse`] leaves them.
fn as_f64(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| match v.as_str() {
        Some("Infinity") => Some(f64::INFINITY),
        Some("-Infinity") => Some(f64::NEG_INFINITY),
        Some("NaN") => Some(f64::NAN),
        _ => None,
    })
}

pub struct Reader<'a> {
    pub map: &'a Map<String, Value>,
    /// The file, for messages.
    pub file: &'static str,
    seen: Vec<&'static str>,
}

impl<'a> Reader<'a> {
    pub fn new(v: &'a Value, file: &'static str) -> Result<Self> {
        Ok(Self {
            map: v
                .as_object()
                .ok_or_else(|| anyhow!("{file}: expected a JSON object"))?,
            file,
            seen: Vec::new(),
        })
    }

    /// Whether the key is present (even as null); marks it read.
    pub fn has(&mut self, key: &'static str) -> bool {
        self.seen.push(key);
        self.map.contains_key(key)
    }

    /// The value, `None` when absent or null (diffusers' `None`).
    pub fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.push(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn unsupported(&self, key: &str, v: &Value, what: &str) -> anyhow::Error {
        anyhow!("{}: unsupported {key} = {v} ({what})", self.file)
    }

    pub fn usize_opt(&mut self, key: &'static str) -> Result<Option<usize>> {
        let file = self.file;
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| anyhow!("{file}: {key} = {v} is not a non-negative integer"))
            })
            .transpose()
    }
    pub fn usize_or(&mut self, key: &'static str, d: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(d))
    }
    pub fn i64_or(&mut self, key: &'static str, d: i64) -> Result<i64> {
        let file = self.file;
        self.get(key)
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| anyhow!("{file}: {key} = {v} is not an integer"))
            })
            .transpose()
            .map(|o| o.unwrap_or(d))
    }
    pub fn f64_opt(&mut self, key: &'static str) -> Result<Option<f64>> {
        let file = self.file;
        self.get(key)
            .map(|v| as_f64(v).ok_or_else(|| anyhow!("{file}: {key} = {v} is not a number")))
            .transpose()
    }
    pub fn f64_or(&mut self, key: &'static str, d: f64) -> Result<f64> {
        Ok(self.f64_opt(key)?.unwrap_or(d))
    }
    pub fn bool_or(&mut self, key: &'static str, d: bool) -> Result<bool> {
        let file = self.file;
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| anyhow!("{file}: {key} = {v} is not a boolean"))
            })
            .transpose()
            .map(|o| o.unwrap_or(d))
    }
    pub fn str_opt(&mut self, key: &'static str) -> Result<Option<&'a str>> {
        let file = self.file;
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| anyhow!("{file}: {key} = {v} is not a string"))
            })
            .transpose()
    }
    /// A string key restricted to `ok` (the first is diffusers' default).
    pub fn choice(&mut self, key: &'static str, ok: &[&'static str]) -> Result<&'static str> {
        match self.get(key) {
            None => Ok(ok[0]),
            Some(v) => match ok.iter().find(|o| v.as_str() == Some(**o)) {
                Some(o) => Ok(o),
                None => Err(self.unsupported(key, v, &format!("supported: {}", ok.join(", ")))),
            },
        }
    }
    /// A key whose only supported value is `want` (diffusers' default): anything else is refused.
    pub fn require(&mut self, key: &'static str, want: &Value) -> Result<()> {
        match self.get(key) {
            Some(v) if v != want => {
                // Numbers compare by value (1 == 1.0).
                if v.as_f64().is_some() && v.as_f64() == want.as_f64() {
                    return Ok(());
                }
                Err(self.unsupported(key, v, &format!("only {want} is supported")))
            }
            None if !want.is_null() && self.map.get(key).is_some_and(Value::is_null) => {
                Err(self.unsupported(key, &Value::Null, &format!("only {want} is supported")))
            }
            _ => Ok(()),
        }
    }
    pub fn list(&mut self, key: &'static str) -> Result<Option<&'a Vec<Value>>> {
        let file = self.file;
        self.get(key)
            .map(|v| {
                v.as_array()
                    .ok_or_else(|| anyhow!("{file}: {key} = {v} is not a list"))
            })
            .transpose()
    }
    pub fn f64_list(&mut self, key: &'static str) -> Result<Option<Vec<f64>>> {
        let file = self.file;
        self.list(key)?
            .map(|l| {
                l.iter()
                    .map(|v| {
                        as_f64(v).ok_or_else(|| anyhow!("{file}: {key} entry {v} is not a number"))
                    })
                    .collect()
            })
            .transpose()
    }

    /// Refuses every key that was not read (keys starting with `_` are diffusers' bookkeeping).
    pub fn finish(&self, what: &str) -> Result<()> {
        let unknown: Vec<&str> = self
            .map
            .keys()
            .map(String::as_str)
            .filter(|k| !k.starts_with('_') && !self.seen.contains(k))
            .collect();
        if !unknown.is_empty() {
            bail!(
                "{}: unknown {what} key(s) {} (not read by this implementation)",
                self.file,
                unknown.join(", ")
            );
        }
        Ok(())
    }
}
