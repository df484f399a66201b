//! Access logs to replay (`--trace FILE`).
//!
//! The format is CSV, one load per line:
//!
//! ```text
//! time,key,request
//! 0.000,user:42,r1
//! 0.000,user:7,r1
//! 0.013,user:42,r2
//! 0.020,user:99
//! ```
//!
//! * `time`: when the load was asked for, in seconds (a decimal number) from
//!   any origin, for example a Unix timestamp. Lines need not be sorted.
//! * `key`: the key as the application names it; anything but a comma, and
//!   surrounding spaces are trimmed.
//! * `request` (optional): lines with the same request id are one request,
//!   loaded together through one loader at the time of its first line, as a
//!   web handler would. A line without one is a request of its own.
//!
//! A first line `time,key` or `time,key,request` is a header; blank lines
//! and lines starting with `#` are skipped. Anything else that does not fit
//! is an error naming its line.

use std::collections::HashMap;
use std::fmt;

/// A parsed trace: its requests in time order, their keys interned as
/// numbers.
#[derive(Debug)]
pub struct Trace {
    pub requests: Vec<Request>,
    /// Distinct keys.
    pub keys: usize,
    /// Loads (lines).
    pub loads: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Seconds after the trace's first load.
    pub at: f64,
    pub keys: Vec<u64>,
}

impl Trace {
    /// Seconds from the first request to the last.
    pub fn span(&self) -> f64 {
        self.requests.last().map_or(0.0, |r| r.at)
    }
}

/// Why a trace could not be read.
#[derive(Debug, PartialEq)]
pub struct ParseError {
    /// 1-based; 0 for the file as a whole.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

impl std::error::Error for ParseError {}

pub fn parse(text: &str) -> Result<Trace, ParseError> {
    let mut ids: HashMap<&str, u64> = HashMap::new();
    // Requests by id, in the order first seen; loads without an id are
    // requests of their own.
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    let mut requests: Vec<(f64, usize, Vec<u64>)> = Vec::new();
    let mut loads = 0;
    for (i, raw) in text.lines().enumerate() {
        let number = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let fail = |message: String| ParseError {
            line: number,
            message,
        };
        if loads == 0 && requests.is_empty() && fields[0] == "time" {
            if fields[1..] != ["key"] && fields[1..] != ["key", "request"] {
                return Err(fail(format!(
                    "a header must be `time,key` or `time,key,request`, found {line:?}"
                )));
            }
            continue;
        }
        if fields.len() < 2 || fields.len() > 3 {
            return Err(fail(format!(
                "expected `time,key` or `time,key,request`, found {} field{}",
                fields.len(),
                if fields.len() == 1 { "" } else { "s" }
            )));
        }
        let time: f64 = fields[0]
            .parse()
            .map_err(|_| fail(format!("time {:?} is not a number of seconds", fields[0])))?;
        if !time.is_finite() || time < 0.0 {
            return Err(fail(format!(
                "time {:?} must be a finite, non-negative number of seconds",
                fields[0]
            )));
        }
        let key = fields[1];
        if key.is_empty() {
            return Err(fail("the key is empty".into()));
        }
        let next = ids.len() as u64;
        let id = *ids.entry(key).or_insert(next);
        loads += 1;
        match fields.get(2).copied().filter(|r| !r.is_empty()) {
            Some(request) => match by_id.get(request) {
                Some(&at) => requests[at].2.push(id),
                None => {
                    by_id.insert(request, requests.len());
                    requests.push((time, number, vec![id]));
                }
            },
            None => requests.push((time, number, vec![id])),
        }
    }
    if loads == 0 {
        return Err(ParseError {
            line: 0,
            message: "the trace has no loads".into(),
        });
    }
    // By time, then by where they appear.
    requests.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let origin = requests[0].0;
    Ok(Trace {
        requests: requests
            .into_iter()
            .map(|(time, _, keys)| Request {
                at: time - origin,
                keys,
            })
            .collect(),
        keys: ids.len(),
        loads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn requests_group_by_id_and_sort_by_time() {
        let trace = parse(
            "time,key,request\n\
             # a comment\n\
             10.5, a ,r1\n\
             \n\
             10.0,b\n\
             10.7,a,r1\n\
             11.0,c,r2\n\
             10.9,b,r2\n",
        )
        .unwrap();
        assert_eq!((trace.loads, trace.keys), (5, 3));
        let got: Vec<(f64, Vec<u64>)> = trace
            .requests
            .iter()
            .map(|r| ((r.at * 10.0).round() / 10.0, r.keys.clone()))
            .collect();
        // a = 0, b = 1, c = 2; r2 is at its first line's time.
        assert_eq!(
            got,
            vec![(0.0, vec![1]), (0.5, vec![0, 0]), (1.0, vec![2, 1])]
        );
        assert_eq!(trace.span(), 1.0);
    }

    #[test]
    fn a_header_is_optional_and_two_fields_suffice() {
        let trace = parse("1,x\n2,y\n2,x\n").unwrap();
        assert_eq!(trace.requests.len(), 3);
        assert_eq!(trace.keys, 2);
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(
            error("time,key\n1,a\nsoon,b\n"),
            "line 3: time \"soon\" is not a number of seconds"
        );
        assert_eq!(
            error("1,a\n2\n"),
            "line 2: expected `time,key` or `time,key,request`, found 1 field"
        );
        assert_eq!(
            error("1,a,r,extra\n"),
            "line 1: expected `time,key` or `time,key,request`, found 4 fields"
        );
        assert_eq!(error("1, ,r\n"), "line 1: the key is empty");
        assert_eq!(
            error("-1,a\n"),
            "line 1: time \"-1\" must be a finite, non-negative number of seconds"
        );
        assert_eq!(
            error("NaN,a\n"),
            "line 1: time \"NaN\" must be a finite, non-negative number of seconds"
        );
        assert_eq!(
            error("inf,a\n"),
            "line 1: time \"inf\" must be a finite, non-negative number of seconds"
        );
        assert_eq!(
            error("time,user\n"),
            "line 1: a header must be `time,key` or `time,key,request`, found \"time,user\""
        );
        assert_eq!(error(""), "the trace has no loads");
        assert_eq!(
            error("# only a comment\ntime,key\n"),
            "the trace has no loads"
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Whatever the text, an answer and no panic.
        let pieces = [
            "", ",", "1", "-", "e9", "a", "\n", "#", " ", "time", "key", "\u{0}", "é", "1e400",
        ];
        let mut state = 12345u64;
        for _ in 0..5000 {
            let mut text = String::new();
            for _ in 0..12 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                text.push_str(pieces[(state >> 33) as usize % pieces.len()]);
            }
            let _ = parse(&text);
        }
    }

    #[test]
    fn the_sample_trace_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/sample_trace.csv"
        ))
        .unwrap();
        let trace = parse(&text).unwrap();
        assert!(
            trace.loads > 1000 && trace.keys > 100,
            "{} loads, {} keys",
            trace.loads,
            trace.keys
        );
        assert!(
            trace.requests.len() < trace.loads,
            "some requests load several keys"
        );
    }
}
