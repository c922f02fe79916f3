//! `openai-proxy usage`: the usage records of the backend as a table, per token and model.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Backend, Now, Row, Tally, local, redis};
use crate::config::{ConfigFile, days_from_civil};

/// How far back the Redis backend keeps usage records (their keys expire after about 400 days).
const REDIS_DAYS: u64 = 400;

/// The table of the usage since `since` (a UTC date, YYYY-MM-DD; all kept when None), of one
/// token or all, from the backend the config at `config_path` names.
pub fn table(
    config_path: &Path,
    since: Option<&str>,
    token: Option<&str>,
) -> Result<String, String> {
    let file = ConfigFile::read(config_path).map_err(|e| e.to_string())?;
    let config = file.parse().map_err(|e| e.to_string())?;
    let since = since.map(parse_day).transpose()?;
    let today = Now::current().day;
    let rows = match &config.limits.backend {
        Backend::Local => {
            let path = super::state_path(&config.limits, &file);
            local::Store::open(path).rows(since.unwrap_or(0), token)
        }
        Backend::Redis(url) => {
            let first = since.unwrap_or(today.saturating_sub(REDIS_DAYS));
            let client = redis::Client::new(url.clone());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let rows = runtime.block_on(async {
                tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    client.rows(first..=today, token),
                )
                .await
                .unwrap_or_else(|_| Err("Redis did not answer within 10s".into()))
            });
            rows.map_err(|e| format!("cannot read the usage from Redis: {e}"))?
        }
    };
    Ok(render(&rows))
}

/// A UTC date, YYYY-MM-DD, as days since the Unix epoch.
fn parse_day(text: &str) -> Result<u64, String> {
    let bad = || format!("--since {text:?}: give a date as YYYY-MM-DD");
    let date: toml::value::Date = match text.parse::<toml::value::Datetime>() {
        Ok(toml::value::Datetime {
            date: Some(date),
            time: None,
            ..
        }) => date,
        _ => return Err(bad()),
    };
    let days = days_from_civil(
        i64::from(date.year),
        i64::from(date.month),
        i64::from(date.day),
    );
    u64::try_from(days).map_err(|_| bad())
}

/// One line per token and model, the days added up, and a header.
fn render(rows: &[Row]) -> String {
    let mut sums: BTreeMap<(&str, &str), Tally> = BTreeMap::new();
    for row in rows {
        sums.entry((&row.token, &row.model))
            .or_default()
            .add(&row.tally);
    }
    let mut lines: Vec<[String; 7]> = vec![
        [
            "TOKEN",
            "MODEL",
            "REQUESTS",
            "PROMPT",
            "COMPLETION",
            "CACHED",
            "REASONING",
        ]
        .map(str::to_owned),
    ];
    for ((token, model), t) in &sums {
        lines.push([
            token.to_string(),
            model.to_string(),
            t.requests.to_string(),
            t.prompt.to_string(),
            t.completion.to_string(),
            t.cached.to_string(),
            t.reasoning.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, width))| match i {
                0 | 1 => format!("{cell:<width$}"),
                _ => format!("{cell:>width$}"),
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_tables() {
        assert_eq!(parse_day("1970-01-02"), Ok(1));
        assert!(parse_day("2026-13-01").is_err());
        assert!(parse_day("yesterday").is_err());
        let row = |day, model: &str, prompt| Row {
            day,
            token: "alice".into(),
            model: model.into(),
            tally: Tally {
                requests: 1,
                prompt,
                ..Tally::default()
            },
        };
        let table = render(&[row(1, "gpt-4o", 5), row(2, "gpt-4o", 7), row(2, "o3", 1)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("TOKEN  MODEL"), "{table}");
        assert!(lines[1].starts_with("alice  gpt-4o"), "{table}");
        assert!(
            lines[1].contains(" 2  ") && lines[1].contains(" 12 "),
            "{table}"
        );
    }
}
