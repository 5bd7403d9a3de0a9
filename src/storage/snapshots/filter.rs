//! containerd's filter syntax (`filters` package), for [`super::Snapshotter::walk`].
//!
//! ```text
//! filter    := selector ("," selector)*          (comma = and)
//! selector  := fieldpath (op value)?             (no op: the field is present)
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_]+
//! op        := "==" | "!=" | "~="                (~= : regular expression search)
//! value     := quoted | /regexp/ | [^,]+
//! quoted    := "..." | '...'  with backslash escapes
//! ```
//!
//! Fields of a snapshot: `name`, `parent`, `kind` (`active`, `view`, `committed`) and
//! `labels.KEY`. Several filters passed to `walk` are or-ed.

use super::Info;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("filter {input:?}: {msg} at byte {pos}")]
pub struct FilterError {
    input: String,
    pos: usize,
    msg: String,
}

#[derive(Clone, Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Clone, Debug)]
struct Selector {
    fieldpath: Vec<String>,
    op: Op,
}

/// One parsed filter: a conjunction of selectors.
#[derive(Clone, Debug)]
pub struct Filter {
    selectors: Vec<Selector>,
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, msg: impl Into<String>) -> FilterError {
        FilterError {
            input: self.input.to_owned(),
            pos: self.pos,
            msg: msg.into(),
        }
    }

    fn rest(&self) -> &str {
        &self.input[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.input.len() - trimmed.len();
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn quoted(&mut self, quote: char) -> Result<String, FilterError> {
        self.pos += quote.len_utf8();
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                c if c == quote => {
                    self.pos += i + c.len_utf8();
                    return Ok(out);
                }
                '\\' => {
                    let Some((_, e)) = chars.next() else { break };
                    // In a regexp, keep escapes other than of the delimiter for the engine.
                    if quote == '/' && e != '/' {
                        out.push('\\');
                        out.push(e);
                        continue;
                    }
                    out.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        '0' => '\0',
                        other => other,
                    });
                }
                c => out.push(c),
            }
        }
        Err(self.err("unterminated quoted string"))
    }

    fn field(&mut self) -> Result<String, FilterError> {
        self.skip_ws();
        match self.peek() {
            Some(q @ ('"' | '\'')) => self.quoted(q),
            _ => {
                let len = self
                    .rest()
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(self.rest().len());
                if len == 0 {
                    return Err(self.err("expected a field name"));
                }
                let f = self.rest()[..len].to_owned();
                self.pos += len;
                Ok(f)
            }
        }
    }

    fn value(&mut self, allow_regex_delim: bool) -> Result<String, FilterError> {
        self.skip_ws();
        match self.peek() {
            Some(q @ ('"' | '\'')) => self.quoted(q),
            Some('/') if allow_regex_delim => self.quoted('/'),
            _ => {
                let len = self.rest().find(',').unwrap_or(self.rest().len());
                let v = self.rest()[..len].trim().to_owned();
                self.pos += len;
                if v.is_empty() {
                    return Err(self.err("expected a value"));
                }
                Ok(v)
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut fieldpath = vec![self.field()?];
        loop {
            self.skip_ws();
            if self.peek() == Some('.') {
                self.pos += 1;
                fieldpath.push(self.field()?);
            } else {
                break;
            }
        }
        self.skip_ws();
        let op = if let Some(r) = self.rest().strip_prefix("==") {
            self.pos = self.input.len() - r.len();
            Op::Equal(self.value(false)?)
        } else if let Some(r) = self.rest().strip_prefix("!=") {
            self.pos = self.input.len() - r.len();
            Op::NotEqual(self.value(false)?)
        } else if let Some(r) = self.rest().strip_prefix("~=") {
            self.pos = self.input.len() - r.len();
            let at = self.pos;
            let pattern = self.value(true)?;
            Op::Matches(Regex::new(&pattern).map_err(|m| FilterError {
                input: self.input.to_owned(),
                pos: at,
                msg: m,
            })?)
        } else {
            Op::Present
        };
        Ok(Selector { fieldpath, op })
    }
}

impl Filter {
    pub fn parse(input: &str) -> Result<Filter, FilterError> {
        let mut p = Parser { input, pos: 0 };
        let mut selectors = vec![p.selector()?];
        loop {
            p.skip_ws();
            match p.peek() {
                None => break,
                Some(',') => {
                    p.pos += 1;
                    selectors.push(p.selector()?);
                }
                Some(_) => return Err(p.err("expected ',' or the end")),
            }
        }
        Ok(Filter { selectors })
    }

    pub fn matches(&self, info: &Info) -> bool {
        self.selectors.iter().all(|s| {
            let (value, present) = field(info, &s.fieldpath);
            match &s.op {
                Op::Present => present,
                Op::Equal(v) => present && value == *v,
                Op::NotEqual(v) => value != *v,
                Op::Matches(re) => present && re.is_match(&value),
            }
        })
    }
}

/// containerd's snapshot adaptor: the value of a field path and whether it is present.
fn field(info: &Info, path: &[String]) -> (String, bool) {
    match path[0].as_str() {
        "name" if path.len() == 1 => (info.name.clone(), !info.name.is_empty()),
        "parent" if path.len() == 1 => {
            let p = info.parent.clone().unwrap_or_default();
            let present = !p.is_empty();
            (p, present)
        }
        "kind" if path.len() == 1 => (info.kind.as_str().to_owned(), true),
        "labels" if path.len() > 1 => match info.labels.get(&path[1..].join(".")) {
            Some(v) => (v.clone(), true),
            None => (String::new(), false),
        },
        _ => (String::new(), false),
    }
}

/// A small backtracking regular-expression engine for `~=`: literals, `.`, classes `[a-z]`,
/// `[^...]`, `\d \w \s`, groups `( )`, alternation `|`, `* + ?` (greedy), anchors `^ $`.
/// Unanchored search, as Go's `MatchString`.
#[derive(Clone, Debug)]
pub struct Regex {
    alts: Vec<Vec<Piece>>,
}

#[derive(Clone, Debug)]
enum Atom {
    Char(char),
    Any,
    Class(Vec<(char, char)>, bool),
    Group(Vec<Vec<Piece>>),
    Start,
    End,
}

#[derive(Clone, Debug)]
struct Piece {
    atom: Atom,
    min: usize,
    max: usize,
}

impl Regex {
    pub fn new(pattern: &str) -> Result<Regex, String> {
        let chars: Vec<char> = pattern.chars().collect();
        let mut pos = 0;
        let alts = parse_alts(&chars, &mut pos)?;
        if pos != chars.len() {
            return Err("unbalanced ')' in regexp".into());
        }
        Ok(Regex { alts })
    }

    pub fn is_match(&self, text: &str) -> bool {
        let t: Vec<char> = text.chars().collect();
        let atom = Atom::Group(self.alts.clone());
        (0..=t.len()).any(|start| {
            match_seq(
                &[Piece {
                    atom: atom.clone(),
                    min: 1,
                    max: 1,
                }],
                &t,
                start,
                &mut |_| true,
            )
        })
    }
}

fn class_escape(c: char) -> Option<(Vec<(char, char)>, bool)> {
    let digits = vec![('0', '9')];
    let word = vec![('0', '9'), ('A', 'Z'), ('a', 'z'), ('_', '_')];
    let space = vec![(' ', ' '), ('\t', '\r')];
    match c {
        'd' => Some((digits, false)),
        'D' => Some((digits, true)),
        'w' => Some((word, false)),
        'W' => Some((word, true)),
        's' => Some((space, false)),
        'S' => Some((space, true)),
        _ => None,
    }
}

fn parse_alts(c: &[char], pos: &mut usize) -> Result<Vec<Vec<Piece>>, String> {
    let mut alts = vec![Vec::new()];
    while *pos < c.len() {
        let atom = match c[*pos] {
            ')' => break,
            '|' => {
                *pos += 1;
                alts.push(Vec::new());
                continue;
            }
            '(' => {
                *pos += 1;
                if c.get(*pos) == Some(&'?') && c.get(*pos + 1) == Some(&':') {
                    *pos += 2;
                }
                let inner = parse_alts(c, pos)?;
                if c.get(*pos) != Some(&')') {
                    return Err("missing ')' in regexp".into());
                }
                *pos += 1;
                Atom::Group(inner)
            }
            '.' => {
                *pos += 1;
                Atom::Any
            }
            '^' => {
                *pos += 1;
                Atom::Start
            }
            '$' => {
                *pos += 1;
                Atom::End
            }
            '[' => {
                *pos += 1;
                let negated = c.get(*pos) == Some(&'^');
                if negated {
                    *pos += 1;
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let Some(&ch) = c.get(*pos) else {
                        return Err("missing ']' in regexp".into());
                    };
                    if ch == ']' && !first {
                        *pos += 1;
                        break;
                    }
                    first = false;
                    let lo = if ch == '\\' {
                        *pos += 1;
                        let e = *c.get(*pos).ok_or("trailing '\\' in regexp")?;
                        if let Some((rs, false)) = class_escape(e) {
                            ranges.extend(rs);
                            *pos += 1;
                            continue;
                        }
                        e
                    } else {
                        ch
                    };
                    *pos += 1;
                    if c.get(*pos) == Some(&'-') && c.get(*pos + 1).is_some_and(|&n| n != ']') {
                        let hi = c[*pos + 1];
                        *pos += 2;
                        ranges.push((lo, hi));
                    } else {
                        ranges.push((lo, lo));
                    }
                }
                Atom::Class(ranges, negated)
            }
            '\\' => {
                *pos += 1;
                let e = *c.get(*pos).ok_or("trailing '\\' in regexp")?;
                *pos += 1;
                match class_escape(e) {
                    Some((rs, neg)) => Atom::Class(rs, neg),
                    None => Atom::Char(match e {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    }),
                }
            }
            '*' | '+' | '?' => return Err("repetition without an operand in regexp".into()),
            ch => {
                *pos += 1;
                Atom::Char(ch)
            }
        };
        let (min, max) = match c.get(*pos) {
            Some('*') => (0, usize::MAX),
            Some('+') => (1, usize::MAX),
            Some('?') => (0, 1),
            _ => (1, 1),
        };
        if (min, max) != (1, 1) {
            *pos += 1;
            // A lazy marker is accepted and treated as greedy (only matching matters here).
            if c.get(*pos) == Some(&'?') {
                *pos += 1;
            }
        }
        alts.last_mut()
            .expect("one alternative")
            .push(Piece { atom, min, max });
    }
    Ok(alts)
}

/// Matches `pieces` at `t[i..]`, then calls `k` with the end position.
fn match_seq(pieces: &[Piece], t: &[char], i: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
    let Some((first, rest)) = pieces.split_first() else {
        return k(i);
    };
    match_rep(first, 0, rest, t, i, k)
}

fn match_rep(
    p: &Piece,
    count: usize,
    rest: &[Piece],
    t: &[char],
    i: usize,
    k: &mut dyn FnMut(usize) -> bool,
) -> bool {
    // Greedy: try one more repetition first (unless it matched nothing, to avoid loops).
    if count < p.max
        && match_atom(&p.atom, t, i, &mut |j| {
            (j != i || count < p.min) && match_rep(p, count + 1, rest, t, j, k)
        })
    {
        return true;
    }
    count >= p.min && match_seq(rest, t, i, k)
}

fn match_atom(a: &Atom, t: &[char], i: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
    match a {
        Atom::Char(c) => t.get(i) == Some(c) && k(i + 1),
        Atom::Any => t.get(i).is_some_and(|&c| c != '\n') && k(i + 1),
        Atom::Class(ranges, negated) => {
            t.get(i)
                .is_some_and(|&c| ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated)
                && k(i + 1)
        }
        Atom::Start => i == 0 && k(i),
        Atom::End => i == t.len() && k(i),
        Atom::Group(alts) => alts.iter().any(|seq| match_seq(seq, t, i, k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::snapshots::Kind;
    use std::time::SystemTime;

    fn info(name: &str, parent: Option<&str>, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.map(Into::into),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn selectors() {
        let a = info(
            "a",
            Some("p"),
            Kind::Active,
            &[("containerd.io/gc.root", "x"), ("l", "2")],
        );
        let c = info("c", None, Kind::Committed, &[]);
        let m = |f: &str, i: &Info| Filter::parse(f).unwrap().matches(i);
        assert!(m("kind==active,labels.\"containerd.io/gc.root\"==x", &a));
        assert!(!m("kind==active", &c));
        assert!(m("parent!=\"\"", &a));
        assert!(!m("parent!=\"\"", &c));
        assert!(m("labels.l", &a));
        assert!(!m("labels.l", &c));
        assert!(m("name~=^a$", &a));
        assert!(m("name~=/[a-c]/", &c));
        assert!(!m("name~=^b", &a));
        assert!(m("labels.l==2", &a));
        assert!(m(" name == a ", &a));
        assert!(!m("bogus", &a));
    }

    #[test]
    fn syntax_errors() {
        assert!(Filter::parse("").is_err());
        assert!(Filter::parse("name==").is_err());
        assert!(Filter::parse("labels.\"x").is_err());
        assert!(Filter::parse("name~=(a").is_err());
        assert!(Filter::parse("name==a b,").is_err());
    }

    #[test]
    fn regexp() {
        let r = |p: &str, s: &str| Regex::new(p).unwrap().is_match(s);
        assert!(r("a+b", "xaaab"));
        assert!(!r("^a+b$", "xaaab"));
        assert!(r("(foo|bar)-\\d+", "a bar-12"));
        assert!(r("[^0-9]$", "12a"));
        assert!(!r("[^0-9]$", "12"));
        assert!(r("a?b*c", "c"));
        assert!(r("(a*)*b", "aaab"));
        assert!(r("", "anything"));
    }
}
