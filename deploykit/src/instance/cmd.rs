//! The command layer: commands are argument vectors, never strings pasted
//! into a shell.
//!
//! A [`Command`] is a program, its arguments, extra environment variables
//! and a working directory. Locally it runs with `tokio::process` exactly as
//! given (no shell). Over SSH, where the protocol takes one command *line*,
//! [`Command::to_shell_line`] turns it into a POSIX shell line in which every
//! word is quoted by the one function [`quote`] — so no byte of an argument
//! can be read by the remote shell as syntax.
//!
//! The result of a run is an [`Output`]: exit status, stdout and stderr (the
//! last [`OUTPUT_LIMIT`] bytes of each are kept). [`Output::check`] turns a
//! non-zero exit into a [`DriverError`] that carries the command, the status
//! and the output tail.

use std::fmt;
use std::process::Stdio;
use std::time::Duration;

use crate::error::{DriverError, Error, Result};

/// How many bytes of stdout and of stderr a run keeps (the last ones: the
/// end of the output is where the error usually is).
pub const OUTPUT_LIMIT: usize = 4096;

/// A program with its arguments, extra environment and working directory.
///
/// Built with infallible setters; [`Command::validate`] (called by every
/// runner before anything runs) rejects what cannot be expressed safely.
#[derive(Clone, PartialEq, Eq)]
pub struct Command {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
}

impl Command {
    /// A command running `program` (looked up in `PATH` when it has no `/`).
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the command (added to the inherited
    /// environment).
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Runs the command in `dir`.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// The program.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// The arguments (without the program).
    pub fn get_args(&self) -> &[String] {
        &self.args
    }

    /// The extra environment variables.
    pub fn get_env(&self) -> &[(String, String)] {
        &self.env
    }

    /// The working directory, if set.
    pub fn get_cwd(&self) -> Option<&str> {
        self.cwd.as_deref()
    }

    /// The program followed by its arguments.
    pub fn argv(&self) -> Vec<&str> {
        std::iter::once(self.program.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect()
    }

    /// Checks that the command can be run safely and exactly.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the program is empty, any part contains a
    /// NUL byte (which no OS argument can hold), an environment name is not
    /// `[A-Za-z_][A-Za-z0-9_]*`, or the program contains `=` while
    /// environment variables are set (the remote `env` would read it as an
    /// assignment).
    pub fn validate(&self) -> Result<()> {
        if self.program.is_empty() {
            return Err(Error::invalid(
                "command",
                "the program is empty; name an executable",
            ));
        }
        let all = self
            .argv()
            .into_iter()
            .chain(self.env.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]))
            .chain(self.cwd.as_deref());
        for part in all {
            if part.contains('\0') {
                return Err(Error::invalid(
                    "command",
                    format!("{part:?} contains a NUL byte, which no command argument can hold; remove it"),
                ));
            }
        }
        for (name, _) in &self.env {
            let ok = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(Error::invalid(
                    "command env",
                    format!("{name:?} is not a valid environment variable name; use [A-Za-z_][A-Za-z0-9_]*"),
                ));
            }
        }
        if !self.env.is_empty() && self.program.contains('=') {
            return Err(Error::invalid(
                "command",
                format!(
                    "the program {:?} contains '=', which `env` would read as a variable; rename or move it",
                    self.program
                ),
            ));
        }
        Ok(())
    }

    /// The command as one POSIX shell line, every word quoted by [`quote`]:
    /// `cd -- <cwd> && exec env <NAME=value>… <program> <args>…`.
    ///
    /// Used where only a line can be sent (SSH `exec`). Call
    /// [`validate`](Self::validate) first; runners do.
    pub fn to_shell_line(&self) -> String {
        self.shell_line(true)
    }

    /// The command as a POSIX shell script that sets the environment with
    /// `export` and then runs `cd -- <cwd> && exec <program> <args>…`: for
    /// sending on a channel's stdin, so that environment values (often
    /// secrets) are never on a command line, which any user of the host can
    /// read with `ps`. Call [`validate`](Self::validate) first.
    pub fn to_shell_script(&self) -> String {
        let mut script = String::new();
        for (k, v) in &self.env {
            script.push_str("export ");
            script.push_str(k);
            script.push('=');
            script.push_str(&quote(v));
            script.push('\n');
        }
        script.push_str(&self.shell_line(false));
        script.push('\n');
        script
    }

    fn shell_line(&self, with_env: bool) -> String {
        let mut line = String::new();
        if let Some(cwd) = &self.cwd {
            line.push_str("cd -- ");
            line.push_str(&quote(cwd));
            line.push_str(" && ");
        }
        line.push_str("exec");
        if with_env && !self.env.is_empty() {
            line.push_str(" env");
            for (k, v) in &self.env {
                line.push(' ');
                line.push_str(&quote(&format!("{k}={v}")));
            }
        }
        for word in self.argv() {
            line.push(' ');
            line.push_str(&quote(word));
        }
        line
    }

    /// Runs the command on this machine with `tokio::process` (no shell),
    /// stdin closed, and waits for it. Dropping the future kills the child.
    ///
    /// # Errors
    /// A [`DriverError`] when the command is invalid or cannot be spawned. A
    /// command that runs and exits non-zero is *not* an error here: see
    /// [`Output::check`].
    pub async fn run_local(&self) -> Result<Output, DriverError> {
        self.run_local_with_timeout(None).await
    }

    /// Like [`run_local`](Self::run_local), killing the command after
    /// `timeout` (a transient error).
    ///
    /// # Errors
    /// As [`run_local`](Self::run_local), plus a transient error on timeout.
    pub async fn run_local_with_timeout(&self, timeout: Option<Duration>) -> Result<Output, DriverError> {
        self.validate()
            .map_err(|e| DriverError::new(format!("refusing to run {self}")).with_source(e))?;
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        let child = cmd
            .spawn()
            .map_err(|e| DriverError::new(format!("cannot start {self}")).with_source(e))?;
        let out = match timeout {
            None => child.wait_with_output().await,
            Some(t) => match tokio::time::timeout(t, child.wait_with_output()).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(DriverError::transient(format!(
                        "{self} did not finish within {}s",
                        t.as_secs_f64()
                    )))
                }
            },
        }
        .map_err(|e| DriverError::new(format!("waiting for {self}")).with_source(e))?;
        Ok(Output {
            status: out.status.code(),
            stdout: tail(&out.stdout),
            stderr: tail(&out.stderr),
            command: self.to_string(),
        })
    }
}

impl fmt::Display for Command {
    /// The command as a shell-quoted line (for messages; never executed from
    /// this form locally).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words: Vec<String> = self.argv().into_iter().map(quote).collect();
        f.write_str(&words.join(" "))
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Command")
            .field("argv", &self.argv())
            .field("env", &self.env)
            .field("cwd", &self.cwd)
            .finish()
    }
}

/// What a finished command left: its exit status and the tails of its
/// output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The exit code; `None` when the command was killed by a signal (or the
    /// remote side did not report one).
    pub status: Option<i32>,
    /// The last [`OUTPUT_LIMIT`] bytes of stdout, lossily decoded.
    pub stdout: String,
    /// The last [`OUTPUT_LIMIT`] bytes of stderr, lossily decoded.
    pub stderr: String,
    /// The command, quoted, for messages.
    pub command: String,
}

impl Output {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// `Ok(self)` when the command succeeded, else a permanent
    /// [`DriverError`] naming `what`, the command, its status and its output.
    ///
    /// # Errors
    /// When the exit status is not 0.
    pub fn check(self, what: &str) -> Result<Self, DriverError> {
        if self.success() {
            Ok(self)
        } else {
            Err(DriverError::new(self.describe_failure(what)))
        }
    }

    /// A one-paragraph description of a failed run.
    pub fn describe_failure(&self, what: &str) -> String {
        let status = match self.status {
            Some(c) => format!("exit status {c}"),
            None => "no exit status (killed by a signal?)".to_string(),
        };
        let mut msg = format!("{what}: `{}` failed with {status}", self.command);
        for (name, text) in [("stderr", &self.stderr), ("stdout", &self.stdout)] {
            let t = text.trim();
            if !t.is_empty() {
                msg.push_str(&format!("; {name}: {t}"));
            }
        }
        msg
    }
}

/// Keeps the last [`OUTPUT_LIMIT`] bytes, marking the cut.
pub(crate) fn tail(bytes: &[u8]) -> String {
    if bytes.len() <= OUTPUT_LIMIT {
        String::from_utf8_lossy(bytes).into_owned()
    } else {
        let cut = &bytes[bytes.len() - OUTPUT_LIMIT..];
        format!(
            "[…{} bytes cut…]{}",
            bytes.len() - OUTPUT_LIMIT,
            String::from_utf8_lossy(cut)
        )
    }
}

/// Quotes `word` for a POSIX shell so that the shell reads it back as
/// exactly one word with exactly these bytes.
///
/// Words made only of `[A-Za-z0-9_./,:=@%+-]` (and not empty) are returned
/// as they are; anything else is wrapped in single quotes, each `'` written
/// as `'\''`. Inside single quotes a POSIX shell interprets nothing — no
/// `$`, backquote, backslash, glob or newline — so this is the whole rule.
///
/// ```
/// use deploykit::instance::quote;
/// assert_eq!(quote("v1.2"), "v1.2");
/// assert_eq!(quote("a b"), "'a b'");
/// assert_eq!(quote("it's $(x)"), r"'it'\''s $(x)'");
/// assert_eq!(quote(""), "''");
/// ```
pub fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./,:=@%+-".contains(&b));
    if plain {
        return word.to_string();
    }
    let mut out = String::with_capacity(word.len() + 2);
    out.push('\'');
    for c in word.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// A fixed shell script run as `sh -c <script> sh <args>…`: the script is a
/// constant of deploykit (never built from input), the arguments arrive as
/// `$1`, `$2`, … and are only ever used quoted (`"$1"`). This runs several
/// steps in one round trip without pasting any value into shell text.
pub(crate) fn script(script: &'static str) -> Command {
    Command::new("sh").arg("-c").arg(script).arg("sh")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sh_words(line: &str) -> Vec<String> {
        // Let a real shell parse `line` as the arguments of printf.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s\\0' {line}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{line}: {:?}", out);
        let mut words: Vec<String> = out
            .stdout
            .split(|b| *b == 0)
            .map(|w| String::from_utf8(w.to_vec()).unwrap())
            .collect();
        words.pop(); // after the last NUL
        words
    }

    #[test]
    fn quoting_known_nasties_round_trips() {
        let nasty = [
            "",
            "'",
            "''",
            "a'b",
            "\"",
            "$(touch /tmp/x)",
            "`id`",
            "*",
            "?",
            "[a]",
            "~",
            "a\nb",
            "\\",
            "\\'",
            "$HOME",
            "; rm -rf /",
            "-n",
            "-e",
            "é ü",
            "\t",
            "!",
            "#",
            "{a,b}",
            "a=b",
            "%",
            "  ",
        ];
        let line: Vec<String> = nasty.iter().map(|w| quote(w)).collect();
        let got = sh_words(&line.join(" "));
        assert_eq!(got, nasty.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn quoting_round_trips_arbitrary_strings(words in proptest::collection::vec("[^\u{0}]{0,24}", 1..6)) {
            let line: Vec<String> = words.iter().map(|w| quote(w)).collect();
            prop_assert_eq!(sh_words(&line.join(" ")), words);
        }

        #[test]
        fn quoting_round_trips_shell_metacharacters(words in proptest::collection::vec("[-a-z'\"$`()*?\\[\\]{}~;&|<>\\\\ \n\t!#=]{0,16}", 1..6)) {
            let line: Vec<String> = words.iter().map(|w| quote(w)).collect();
            prop_assert_eq!(sh_words(&line.join(" ")), words);
        }
    }

    #[tokio::test]
    async fn shell_line_runs_the_same_argv_env_and_cwd_as_local() {
        let dir = std::env::temp_dir();
        let cmd = Command::new("sh")
            .args([
                "-c",
                "printf '%s|' \"$PWD\" \"$X\" \"$@\"",
                "sh",
                "a b",
                "$(no)",
                "it's",
            ])
            .env("X", "y z'")
            .cwd(dir.to_str().unwrap());
        let local = cmd.run_local().await.unwrap().check("local").unwrap();
        let via_shell = Command::new("sh")
            .args(["-c", &cmd.to_shell_line()])
            .run_local()
            .await
            .unwrap()
            .check("shell line")
            .unwrap();
        assert_eq!(local.stdout, via_shell.stdout);
        let canon = std::fs::canonicalize(&dir).unwrap();
        assert!(
            local.stdout.starts_with(canon.to_str().unwrap())
                || local.stdout.starts_with(dir.to_str().unwrap()),
            "{}",
            local.stdout
        );
        assert!(
            local.stdout.ends_with("|y z'|a b|$(no)|it's|"),
            "{}",
            local.stdout
        );
    }

    #[tokio::test]
    async fn failures_carry_status_and_output_tail() {
        let out = Command::new("sh")
            .args([
                "-c",
                "head -c 10000 /dev/zero | tr '\\0' x; echo; echo boom >&2; exit 3",
            ])
            .run_local()
            .await
            .unwrap();
        assert_eq!(out.status, Some(3));
        assert!(
            out.stdout.starts_with("[…5905 bytes cut…]"),
            "{}",
            &out.stdout[..40]
        );
        assert!(out.stdout.len() < OUTPUT_LIMIT + 40);
        let err = out.check("testing").unwrap_err().to_string();
        assert!(
            err.contains("testing") && err.contains("exit status 3") && err.contains("boom"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn invalid_commands_are_refused_before_running() {
        for (cmd, what) in [
            (Command::new(""), "empty"),
            (Command::new("echo").arg("a\0b"), "NUL"),
            (Command::new("echo").env("A B", "x"), "variable name"),
            (Command::new("a=b").env("X", "1"), "'='"),
        ] {
            let err = cmd.run_local().await.unwrap_err();
            let text = format!("{err}");
            assert!(text.contains(what), "{text}");
        }
    }

    #[tokio::test]
    async fn timeout_is_transient() {
        let err = Command::new("sleep")
            .arg("5")
            .run_local_with_timeout(Some(Duration::from_millis(50)))
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
    }
}
