//! Commands by mail: who sent a message (`receive`), doing what it asks (`run_job`, a job
//! on the `mail` queue) through the same service functions as the API, and the reply.
//!
//! A command is accepted only from a user's registered address, and only when the message
//! proves it came from them: it was sent to their secret sub-address (`agent+<secret>@...`),
//! or it carries a DKIM signature that verifies for the sender's own domain (SendGrid's
//! verdict on the webhook path, our own verification with `mail-auth` on the SMTP path).
//! Everything else is stored as rejected, audited, and never answered: a reply to a forged
//! sender is backscatter. Automatic mail (out-of-office, lists) is never answered either.
//!
//! A message is worked on at most once per sender and Message-ID; the work is a job, so a
//! process that dies mid-command leaves it to the next worker. Each step is safe to repeat:
//! `create` finds the environment it made by its audit line (the actor names the mail),
//! `execute` never runs its command twice (the mail notes when it began), and the answer is
//! stored before it is sent, so a retry re-sends the same answer with the same Message-ID.

use crate::App;
use crate::error::{AppError, AppResult};
use crate::service::{CreateInput, ExecInput, SizeRequest};
use hearth_core::{EnvState, JobKind};
use hearth_mail::{Command, CreateRequest, Inbound, Recipient};
use hearth_queue::{JobError, Lease};
use hearth_store::{Environment, Job, Mail, NewJob, NewMail, Stored, User};
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use std::net::SocketAddr;
use std::time::Duration;

/// The queue mail jobs run on.
pub const MAIL_QUEUE: &str = "mail";
/// How long after the mail arrived `create` waits for the environment to run before it
/// answers (the job looks every `POLL`, holding no worker in between).
pub const CREATE_WAIT: Duration = Duration::from_secs(600);
/// The same for `destroy` and the VM being gone.
pub const DESTROY_WAIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_secs(2);
/// How long a stored answer is offered to a relay that does not take it (every
/// `HEARTH_MAIL_BACKOFF_MS`, 10 s).
pub const RELAY_PATIENCE: Duration = Duration::from_secs(86_400);
/// The longest answer sent; command output beyond it is cut (the API has all of it).
pub const MAX_ANSWER_CHARS: usize = 64 * 1024;
/// Rejected messages recorded (and audited) per hour at most; more are only counted in
/// the log.
pub const REJECTED_PER_HOUR: i64 = 1_000;
/// The most environments a `list` answer names.
pub const LIST_LIMIT: i64 = 50;

/// Commands by mail, when `HEARTH_MAIL_ADDRESS` is set.
#[derive(Debug, Clone)]
pub struct MailConfig {
    /// `HEARTH_MAIL_ADDRESS`: the agent's address (`agent@example.com`); users write to it,
    /// or to `agent+<secret>@example.com`, and replies come from it.
    pub address: String,
    /// `HEARTH_MAIL_RELAY`: where replies are sent (`smtp://host:25`, `smtps://user:pass@host`,
    /// `smtp://host:587?tls=required`), as lettre reads it.
    pub relay: String,
    /// `HEARTH_SMTP_LISTEN`: the SMTP listener's address (none when unset).
    pub smtp_listen: Option<String>,
    /// `HEARTH_MAIL_WEBHOOK_SECRET`: turns on `POST /v1/mail/inbound` (SendGrid Inbound
    /// Parse), which then needs this secret.
    pub webhook_secret: Option<String>,
    /// `HEARTH_MAIL_DNS`: the DNS server DKIM keys are looked up at (`ip:port`); the system's
    /// resolvers when unset.
    pub dns: Option<SocketAddr>,
    /// `HEARTH_MAIL_PER_HOUR`: commands one user may send per hour (30); more are refused
    /// unanswered.
    pub per_hour: i64,
    /// `HEARTH_SMTP_MAX_CONNECTIONS`: SMTP sessions at once (64).
    pub max_connections: usize,
}

impl MailConfig {
    pub fn from_env() -> Result<Option<MailConfig>, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let Some(address) = var("HEARTH_MAIL_ADDRESS") else {
            for name in [
                "HEARTH_SMTP_LISTEN",
                "HEARTH_MAIL_WEBHOOK_SECRET",
                "HEARTH_MAIL_RELAY",
            ] {
                if var(name).is_some() {
                    return Err(format!(
                        "{name} needs HEARTH_MAIL_ADDRESS, the address commands are sent to"
                    ));
                }
            }
            return Ok(None);
        };
        let address = hearth_mail::address(&address).ok_or_else(|| {
            format!(
                "HEARTH_MAIL_ADDRESS must be an address like agent@example.com, got {address:?}"
            )
        })?;
        if address.split('@').next().is_some_and(|l| l.contains('+')) {
            return Err(
                "HEARTH_MAIL_ADDRESS must not contain '+': users' secrets follow it".into(),
            );
        }
        let relay = var("HEARTH_MAIL_RELAY").ok_or(
            "HEARTH_MAIL_ADDRESS needs HEARTH_MAIL_RELAY, the SMTP server replies are sent through (smtp://host:port)",
        )?;
        AsyncSmtpTransport::<Tokio1Executor>::from_url(&relay)
            .map_err(|e| format!("HEARTH_MAIL_RELAY {relay:?} is not an SMTP URL: {e}"))?;
        let smtp_listen = var("HEARTH_SMTP_LISTEN");
        let webhook_secret = var("HEARTH_MAIL_WEBHOOK_SECRET");
        if let Some(s) = &webhook_secret
            && s.len() < 16
        {
            return Err("HEARTH_MAIL_WEBHOOK_SECRET must be at least 16 characters".into());
        }
        if smtp_listen.is_none() && webhook_secret.is_none() {
            return Err(
                "HEARTH_MAIL_ADDRESS needs a way in: HEARTH_SMTP_LISTEN (an SMTP listener) or HEARTH_MAIL_WEBHOOK_SECRET (the SendGrid webhook)".into(),
            );
        }
        let dns = var("HEARTH_MAIL_DNS")
            .map(|d| {
                d.parse()
                    .map_err(|_| format!("HEARTH_MAIL_DNS must be ip:port, got {d:?}"))
            })
            .transpose()?;
        let number = |name: &str, default: i64| -> Result<i64, String> {
            var(name).map_or(Ok(default), |v| {
                v.parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or(format!("{name} must be a number of at least 1, got {v:?}"))
            })
        };
        Ok(Some(MailConfig {
            address,
            relay,
            smtp_listen,
            webhook_secret,
            dns,
            per_hour: number("HEARTH_MAIL_PER_HOUR", 30)?,
            max_connections: number("HEARTH_SMTP_MAX_CONNECTIONS", 64)? as usize,
        }))
    }

    fn domain(&self) -> &str {
        hearth_mail::domain_of(&self.address)
    }
}

/// The mail side of a running node: the relay replies go through, and the DKIM verifier.
pub struct MailService {
    pub config: MailConfig,
    relay: AsyncSmtpTransport<Tokio1Executor>,
    dkim: mail_auth::MessageAuthenticator,
}

impl MailService {
    pub fn new(config: MailConfig) -> Result<MailService, String> {
        let relay = AsyncSmtpTransport::<Tokio1Executor>::from_url(&config.relay)
            .map_err(|e| format!("HEARTH_MAIL_RELAY: {e}"))?
            .timeout(Some(Duration::from_secs(30)))
            .build();
        let dkim = match config.dns {
            Some(server) => {
                use mail_auth::hickory_resolver::config::{
                    NameServerConfig, ResolverConfig, ResolverOpts,
                };
                let mut ns = NameServerConfig::udp_and_tcp(server.ip());
                for c in &mut ns.connections {
                    c.port = server.port();
                }
                let mut opts = ResolverOpts::default();
                opts.timeout = Duration::from_secs(5);
                mail_auth::MessageAuthenticator::new(
                    ResolverConfig::from_name_servers(vec![ns]),
                    opts,
                )
            }
            None => mail_auth::MessageAuthenticator::new_system_conf(),
        }
        .map_err(|e| format!("the DNS resolver for DKIM cannot be made: {e}"))?;
        Ok(MailService {
            config,
            relay,
            dkim,
        })
    }

    /// Whether a DKIM signature of `domain` itself verifies on `raw`; an error when the
    /// domain's key could not be looked up for now (so the sender is told to try again,
    /// not silently refused).
    async fn dkim_passes(&self, raw: &[u8], domain: &str) -> AppResult<bool> {
        let Some(message) = mail_auth::AuthenticatedMessage::parse(raw) else {
            return Ok(false);
        };
        let outputs = self.dkim.verify_dkim(&message).await;
        let temporary = outputs.iter().any(|o| {
            matches!(o.result(), mail_auth::DkimResult::TempError(_))
                && o.signature()
                    .is_some_and(|s| s.d.eq_ignore_ascii_case(domain))
        });
        let passed = outputs.iter().any(|o| {
            *o.result() == mail_auth::DkimResult::Pass
                && o.signature()
                    .is_some_and(|s| signature_counts(&s.d, &s.h, s.l, domain))
        });
        if !passed && temporary {
            return Err(AppError::Unavailable(format!(
                "the DKIM key of {domain} cannot be looked up now"
            )));
        }
        Ok(passed)
    }
}

/// Headers a signature must cover to prove a command: who, what, and which message (so a
/// copy of a signed message cannot be sent again under another Message-ID).
const SIGNED_HEADERS: [&str; 3] = ["from", "subject", "message-id"];

/// Whether a verified DKIM signature proves a command from `domain`: it is the domain's own
/// (`d=` exactly), covers `SIGNED_HEADERS`, and signs the whole body (no `l=`, under which
/// text could be appended, a code block say).
fn signature_counts(d: &str, signed: &[String], body_length: u64, domain: &str) -> bool {
    d.eq_ignore_ascii_case(domain)
        && body_length == 0
        && SIGNED_HEADERS
            .iter()
            .all(|h| signed.iter().any(|s| s.trim().eq_ignore_ascii_case(h)))
}

/// How a message arrived.
pub enum Arrival<'a> {
    /// By our SMTP listener: the raw message and the envelope's recipients.
    Smtp {
        raw: &'a [u8],
        /// `MAIL FROM`: empty for a bounce.
        envelope_sender: &'a str,
        recipients: &'a [String],
    },
    /// By the webhook: the message as SendGrid read it, its envelope recipients, and its
    /// `dkim` verdict field.
    Webhook {
        inbound: Inbound,
        recipients: &'a [String],
        dkim: &'a str,
    },
}

/// What became of a received message (the SMTP and HTTP answers do not show it: a sender
/// learns nothing from them, but tests and logs do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipt {
    Queued(i64),
    Duplicate(i64),
    Rejected(String),
}

/// The sub-address secret a user writes to: 128 random bits, base32 lower-case (local parts
/// may be lower-cased on the way).
pub fn new_mail_token() -> String {
    use rand::RngCore;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut bytes = [0u8; 26];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
        .iter()
        .map(|b| ALPHABET[(b & 31) as usize] as char)
        .collect()
}

/// The stored form of a sub-address secret: the store's token hash, of the secret as
/// lower-cased on the way (local parts may be).
fn token_hash(token: &str) -> String {
    hearth_store::hash_token(&token.to_lowercase())
}

impl App {
    fn mail_service(&self) -> AppResult<&MailService> {
        self.mail.as_deref().ok_or(AppError::NotFound(
            "mail commands (HEARTH_MAIL_ADDRESS is not set)",
        ))
    }

    /// Makes (or replaces) the caller's secret sub-address; returns it, shown this once.
    pub async fn rotate_mail_address(&self, user: &User) -> AppResult<String> {
        let mail = self.mail_service()?;
        let token = new_mail_token();
        self.store
            .set_mail_token_hash(&user.id, &token_hash(&token))
            .await?;
        self.store
            .audit(&user.id, "mail_address_rotate", None, "success", None, None)
            .await?;
        let (local, domain) = mail.config.address.split_once('@').unwrap_or_default();
        Ok(format!("{local}+{token}@{domain}"))
    }

    /// Takes in a message: decides who sent it and whether they proved it, stores it, and
    /// queues the work. Never errors on what the message says; only on storage failing.
    pub async fn receive(&self, arrival: Arrival<'_>) -> AppResult<Receipt> {
        let mail = self.mail_service()?;
        let (via, inbound, recipients) = match &arrival {
            Arrival::Smtp {
                raw, recipients, ..
            } => match hearth_mail::parse_message(raw) {
                Ok(m) => ("smtp", m, *recipients),
                Err(e) => return self.reject_unread("smtp", recipients, &e).await,
            },
            Arrival::Webhook {
                inbound,
                recipients,
                ..
            } => ("webhook", inbound.clone(), *recipients),
        };
        let sender = inbound.from.clone().unwrap_or_default();
        // The recipient as stored: a sub-address's secret is never written down.
        let recipient = recipients
            .first()
            .map(|r| match hearth_mail::recipient(r, &mail.config.address) {
                Recipient::SubAddress(_) => {
                    let (local, domain) = mail.config.address.split_once('@').unwrap_or_default();
                    format!("{local}+…@{domain}")
                }
                _ => hearth_mail::address(r).unwrap_or_default(),
            })
            .unwrap_or_default();
        let mut record = NewMail {
            message_id: inbound.message_id.clone(),
            via: via.into(),
            sender: sender.clone(),
            recipient,
            subject: inbound.subject.clone(),
            body: inbound.text.clone(),
            user_id: None,
            proof: None,
            command: None,
            status: "rejected".into(),
            outcome: None,
        };
        let (user, proof) = match self.judge(mail, &arrival, &inbound, recipients).await? {
            Ok(verdict) => verdict,
            Err(why) => {
                tracing::info!(via, sender = %sender, message_id = %inbound.message_id, "mail rejected: {why}");
                // Kept as a record of who tried what, without its text; at most
                // `REJECTED_PER_HOUR` an hour, so a flood of forgeries fills nothing.
                record.body = String::new();
                record.outcome = Some(why.clone());
                if self
                    .store
                    .rejected_mail_since(self.now() - 3_600_000)
                    .await?
                    < REJECTED_PER_HOUR
                {
                    self.store
                        .insert_mail(&record, None, &format!("mail:{sender}"))
                        .await?;
                } else {
                    tracing::warn!(
                        "over {REJECTED_PER_HOUR} rejected messages this hour: not recording this one"
                    );
                }
                return Ok(Receipt::Rejected(why));
            }
        };
        let command = hearth_mail::command::parse(&inbound.subject, &inbound.text);
        record.user_id = Some(user.id.clone());
        record.proof = Some(proof.into());
        record.command = Some(command.name().into());
        record.status = "queued".into();
        let actor = format!("mail:{sender}");
        let job = NewJob {
            queue: MAIL_QUEUE.into(),
            kind: "mail".into(),
            environment_id: String::new(),
            max_attempts: self.queue.config(MAIL_QUEUE).map_or(1, |c| c.max_attempts),
            actor: actor.clone(),
        };
        Ok(
            match self.store.insert_mail(&record, Some(job), &actor).await? {
                Stored::New(id) => {
                    tracing::info!(via, sender = %sender, mail = id, command = command.name(), proof, "mail accepted");
                    self.wake(MAIL_QUEUE);
                    Receipt::Queued(id)
                }
                Stored::Duplicate(id) => {
                    tracing::info!(via, sender = %sender, mail = id, "mail delivered again; already taken");
                    Receipt::Duplicate(id)
                }
            },
        )
    }

    /// Who sent the message and what proves it; or why it is refused.
    async fn judge(
        &self,
        mail: &MailService,
        arrival: &Arrival<'_>,
        inbound: &Inbound,
        recipients: &[String],
    ) -> AppResult<Result<(User, &'static str), String>> {
        let ours: Vec<Recipient> = recipients
            .iter()
            .map(|r| hearth_mail::recipient(r, &mail.config.address))
            .filter(|r| *r != Recipient::Other)
            .collect();
        if ours.is_empty() {
            return Ok(Err("not addressed to the agent".into()));
        }
        if let Arrival::Smtp {
            envelope_sender: "",
            ..
        } = arrival
        {
            return Ok(Err("a bounce (null envelope sender): never answered".into()));
        }
        if inbound.automatic {
            return Ok(Err(
                "sent by a machine (Auto-Submitted, Precedence or List-Id): never answered".into(),
            ));
        }
        let sender = inbound.from.clone().unwrap_or_default();
        let Some(user) = self.store.user_by_email(&sender).await? else {
            return Ok(Err(format!("{sender:?} is no user's address")));
        };
        let stored_hash = self.store.mail_token_hash(&user.id).await?;
        let token_ok = ours.iter().any(|r| match (r, &stored_hash) {
            (Recipient::SubAddress(token), Some(hash)) => {
                crate::sign_in::same_secret(&token_hash(token), hash)
            }
            _ => false,
        });
        let domain = hearth_mail::domain_of(&sender);
        let proof = if token_ok {
            "sub-address"
        } else {
            let dkim_ok = match arrival {
                Arrival::Smtp { raw, .. } => mail.dkim_passes(raw, domain).await?,
                Arrival::Webhook { dkim, .. } => hearth_mail::sendgrid_dkim_passes(dkim, domain),
            };
            if !dkim_ok {
                return Ok(Err(format!(
                    "from {sender}'s address but unproven: neither their sub-address secret nor a DKIM signature of {domain} that verifies"
                )));
            }
            "dkim"
        };
        let recent = self
            .store
            .mail_count_since(&user.id, self.now() - 3_600_000)
            .await?;
        if recent >= mail.config.per_hour {
            return Ok(Err(format!(
                "{sender} sent {recent} commands in the last hour; the limit is {} (HEARTH_MAIL_PER_HOUR)",
                mail.config.per_hour
            )));
        }
        Ok(Ok((user, proof)))
    }

    async fn reject_unread(
        &self,
        via: &str,
        recipients: &[String],
        why: &str,
    ) -> AppResult<Receipt> {
        let why = format!("unreadable: {why}");
        let new = NewMail {
            message_id: format!("unreadable-{}", uuid::Uuid::new_v4()),
            via: via.into(),
            sender: String::new(),
            recipient: recipients.first().cloned().unwrap_or_default(),
            subject: String::new(),
            body: String::new(),
            user_id: None,
            proof: None,
            command: None,
            status: "rejected".into(),
            outcome: Some(why.clone()),
        };
        self.store.insert_mail(&new, None, "mail:unknown").await?;
        Ok(Receipt::Rejected(why))
    }
}

/// An answer to a mail: what it says, whether the command did what was asked, and the
/// environment it is about.
struct Answer {
    ok: bool,
    text: String,
    slug: Option<String>,
}

impl Answer {
    fn ok(text: String, env: Option<&Environment>) -> Answer {
        Answer {
            ok: true,
            text,
            slug: env.map(|e| e.slug.clone()),
        }
    }
    fn failed(text: String, env: Option<&Environment>) -> Answer {
        Answer {
            ok: false,
            text,
            slug: env.map(|e| e.slug.clone()),
        }
    }
}

/// A failure worth another attempt (the database did not answer, say).
fn retry(e: impl std::fmt::Display) -> JobError {
    JobError::Retry(e.to_string())
}

/// Store errors and unavailable dependencies are worth another attempt; the rest is the
/// answer.
fn retry_or(e: AppError) -> Result<AppError, JobError> {
    match e {
        AppError::Unavailable(m) | AppError::Internal(m) => Err(JobError::Retry(m)),
        other => Ok(other),
    }
}

/// Runs a mail job (`environment_id` is `mail:<id>`).
pub async fn run_job(app: &App, job: &Job, lease: &Lease) -> Result<(), JobError> {
    let id: i64 = job
        .environment_id
        .strip_prefix("mail:")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| JobError::Fatal(format!("{:?} names no mail", job.environment_id)))?;
    let Some(service) = app.mail.as_deref() else {
        // Not an attempt of its own: a node with mail set up will take it.
        return Err(JobError::Later(
            "this node has no HEARTH_MAIL_ADDRESS; a node with it must answer".into(),
            Duration::from_secs(30),
        ));
    };
    let mail = app.store.mail(id).await.map_err(retry)?;
    if mail.replied_at.is_some() {
        return Ok(());
    }
    let user_id = mail
        .user_id
        .clone()
        .ok_or_else(|| JobError::Fatal("a rejected mail has no work".into()))?;
    // Answered before (a crash, a relay failure): the stored answer is sent again below.
    if !matches!(mail.status.as_str(), "done" | "failed") {
        let user = app.store.user(&user_id).await.map_err(retry)?;
        let outcome = if job.exhausted() {
            Err(JobError::Retry(format!(
                "the server stopped {} times while working on it",
                job.crashes
            )))
        } else {
            answer(app, &mail, &user, job, lease).await
        };
        let answer = match outcome {
            Ok(a) => a,
            Err(JobError::Retry(why)) if job.is_last_attempt() || job.exhausted() => {
                // Say what was made already, so sending it again does not make it twice.
                let made = app
                    .store
                    .environment_created_by(&mail_actor(&mail))
                    .await
                    .ok()
                    .flatten();
                let made = match made {
                    Some(id) => match app.store.environment(&id).await {
                        Ok(env) => format!(
                            " {} was made for it already ({}): do not send it again, reply \"status\".",
                            env.slug, env.state
                        ),
                        Err(_) => String::new(),
                    },
                    None => " Send it again later.".into(),
                };
                Answer::failed(
                    format!("Hearth could not do this: {why}. Nothing more will be tried.{made}\n"),
                    None,
                )
            }
            Err(e) => return Err(e),
        };
        let text = cut(&answer.text, MAX_ANSWER_CHARS);
        let subject = reply_subject(&mail.subject, answer.slug.as_deref());
        let status = if answer.ok { "done" } else { "failed" };
        // Kept only if it is the first answer and this job still holds its lease; if another
        // worker answered first (this one's lease lapsed), its answer is the one sent.
        app.store
            .answer_mail(id, status, &text, &subject, job.id, &lease.owner)
            .await
            .map_err(retry)?;
    }
    let mail = app.store.mail(id).await.map_err(retry)?;
    if !matches!(mail.status.as_str(), "done" | "failed") {
        return Err(JobError::Retry("the job's lease was lost".into()));
    }
    let ok = mail.status == "done";
    let text = mail.outcome.clone().unwrap_or_default();
    let reply_id = format!(
        "hearth-reply-{id}-{}@{}",
        app.installation_id,
        service.config.domain()
    );
    if let Err((permanent, why)) = send_reply(service, &mail, &reply_id, &text).await {
        if permanent {
            return Err(JobError::Fatal(format!("{why} (the answer stays stored)")));
        }
        // The answer is stored: keep offering it to the relay, without spending attempts,
        // for a day after it was made.
        if app.now() - mail.updated_at < RELAY_PATIENCE.as_millis() as i64 {
            let again = app
                .queue
                .config(MAIL_QUEUE)
                .map_or(Duration::from_secs(10), |c| c.backoff);
            tracing::warn!(mail = id, "{why}; trying again in {} ms", again.as_millis());
            return Err(JobError::Later(why, again));
        }
        return Err(JobError::Fatal(format!(
            "{why}; given up after a day (the answer stays stored)"
        )));
    }
    app.store
        .mark_mail_replied(id, &reply_id)
        .await
        .map_err(retry)?;
    tracing::info!(mail = id, ok, to = %mail.sender, "mail answered");
    Ok(())
}

/// Who a mail's actions are audited as: its sender, and which mail.
fn mail_actor(mail: &Mail) -> String {
    format!("mail:{} #{}", mail.sender, mail.id)
}

async fn answer(
    app: &App,
    mail: &Mail,
    user: &User,
    job: &Job,
    lease: &Lease,
) -> Result<Answer, JobError> {
    let command = hearth_mail::command::parse(&mail.subject, &mail.body);
    let actor = mail_actor(mail);
    let target = match command.target() {
        Some(t) => match app.owned_environment(user, t).await {
            Ok(env) => Some(env),
            Err(e) => {
                let e = retry_or(e)?;
                return Ok(Answer::failed(
                    format!("{t}: {e}. Reply \"list\" to see your environments."),
                    None,
                ));
            }
        },
        None => None,
    };
    Ok(match (command, target) {
        (Command::Create(req), _) => create(app, mail, user, req, &actor).await?,
        (Command::Destroy { .. }, Some(env)) => {
            // Asked once: a retry finds it destroying and only waits.
            let pending = app
                .store
                .has_pending_job(&env.id, JobKind::Destroy.as_str())
                .await
                .map_err(retry)?;
            if !pending
                && !matches!(env.state, EnvState::Destroyed | EnvState::Destroying)
                && let Err(e) = app.request(&actor, &env, JobKind::Destroy).await
            {
                let e = retry_or(e)?;
                return Ok(Answer::failed(
                    format!("{} was not destroyed: {e}.", env.slug),
                    Some(&env),
                ));
            }
            let env = app.store.environment(&env.id).await.map_err(retry)?;
            if env.state == EnvState::Destroyed {
                Answer::ok(
                    format!("{} is destroyed: its VM is gone.\n", env.slug),
                    Some(&env),
                )
            } else if waited(app, mail) < DESTROY_WAIT {
                return Err(JobError::Later(
                    format!("{} is {}", env.slug, env.state),
                    POLL,
                ));
            } else {
                Answer::failed(
                    format!(
                        "{} is being destroyed, not gone after {} s ({}). Reply \"status\" to follow it.\n",
                        env.slug,
                        DESTROY_WAIT.as_secs(),
                        env.state
                    ),
                    Some(&env),
                )
            }
        }
        (Command::Status { .. }, Some(env)) => Answer::ok(describe(&env), Some(&env)),
        (Command::Connect { .. }, Some(env)) => Answer::ok(connect_text(&env), Some(&env)),
        (
            Command::Execute {
                code, working_dir, ..
            },
            Some(env),
        ) => execute(app, mail, user, &env, code, working_dir, job, lease).await?,
        (Command::List, _) => {
            let (envs, _) = app
                .store
                .list_environments(Some(&user.id), None, false, None, LIST_LIMIT)
                .await
                .map_err(retry)?;
            let mut text = if envs.is_empty() {
                "You have no environments. Send \"create\" to make one.\n".to_string()
            } else {
                format!("Your environments ({}):\n\n", envs.len())
            };
            for e in &envs {
                text.push_str(&format!(
                    "  {}  {:<12} {}\n",
                    e.slug,
                    e.state.to_string(),
                    e.name
                ));
            }
            Answer::ok(text, None)
        }
        (Command::Help { problem }, _) => {
            let mut text = String::new();
            if let Some(p) = &problem {
                text.push_str(&format!("Hearth did not act on your message: {p}.\n\n"));
            }
            text.push_str(&help_text(
                &app.mail
                    .as_ref()
                    .map(|m| m.config.address.clone())
                    .unwrap_or_default(),
            ));
            Answer {
                ok: problem.is_none(),
                text,
                slug: None,
            }
        }
        (_, None) => Answer::failed("That command needs an environment.\n".into(), None),
    })
}

async fn create(
    app: &App,
    mail: &Mail,
    user: &User,
    req: CreateRequest,
    actor: &str,
) -> Result<Answer, JobError> {
    // A retry after a crash finds the environment this mail made, by the audit line's actor.
    let made = app
        .store
        .environment_created_by(actor)
        .await
        .map_err(retry)?;
    let env = match made {
        Some(id) => app.store.environment(&id).await.map_err(retry)?,
        None => {
            let input = CreateInput {
                name: req.name.unwrap_or_else(|| "By mail".into()),
                size: SizeRequest {
                    vcpus: req.vcpus,
                    memory_mb: req.memory_mb,
                    disk_gb: req.disk_gb,
                },
                duration_hours: req.duration_hours,
                init_script: req.init_script,
                environment_vars: req.environment_vars,
                repository_url: req.repository,
                for_mail: Some(mail.id),
                ..Default::default()
            };
            match app.create_environment_as(user, input, actor).await {
                Ok(env) => env,
                // Another worker holding this job made it first (this one's lease lapsed).
                Err(AppError::Conflict(m)) if m.contains("made an environment already") => {
                    return Err(JobError::Retry(m));
                }
                Err(e) => {
                    let e = retry_or(e)?;
                    return Ok(Answer::failed(format!("Nothing was created: {e}.\n"), None));
                }
            }
        }
    };
    let _ = app.store.set_mail_environment(mail.id, &env.id).await;
    let settled = matches!(env.state, EnvState::Error | EnvState::Destroyed)
        && !app
            .store
            .has_outstanding_job(&env.id)
            .await
            .map_err(retry)?;
    Ok(if env.state == EnvState::Running {
        Answer::ok(
            format!("{} is running.\n\n{}", env.slug, describe(&env)),
            Some(&env),
        )
    } else if settled {
        Answer::failed(
            format!("{} did not come up.\n\n{}", env.slug, describe(&env)),
            Some(&env),
        )
    } else if waited(app, mail) < CREATE_WAIT {
        return Err(JobError::Later(
            format!("{} is {}", env.slug, env.state),
            POLL,
        ));
    } else {
        Answer::ok(
            format!(
                "{} is still coming up after {} minutes. Reply \"status\" to see when it runs.\n\n{}",
                env.slug,
                CREATE_WAIT.as_secs() / 60,
                describe(&env)
            ),
            Some(&env),
        )
    })
}

/// How long ago the mail arrived.
fn waited(app: &App, mail: &Mail) -> Duration {
    Duration::from_millis((app.now() - mail.received_at).max(0) as u64)
}

#[allow(clippy::too_many_arguments)]
async fn execute(
    app: &App,
    mail: &Mail,
    user: &User,
    env: &Environment,
    code: String,
    working_dir: Option<String>,
    job: &Job,
    lease: &Lease,
) -> Result<Answer, JobError> {
    let input = ExecInput {
        code,
        timeout_seconds: None,
        working_dir,
    };
    if let Err(e) = input.validate() {
        return Ok(Answer::failed(
            format!("Nothing was run: {e}.\n"),
            Some(env),
        ));
    }
    let _ = app.store.set_mail_environment(mail.id, &env.id).await;
    if !app
        .store
        .begin_mail_exec(mail.id, job.id, &lease.owner)
        .await
        .map_err(retry)?
    {
        return Ok(Answer::failed(
            format!(
                "Hearth stopped while your command ran in {}, and does not run it twice. Check what it did, then send it again if needed.\n",
                env.slug
            ),
            Some(env),
        ));
    }
    Ok(match app.exec(user, env, input).await {
        Ok(r) => {
            let mut text = format!(
                "In {}, exit code {}{}.\n",
                env.slug,
                r.execution
                    .exit_code
                    .map_or("none".to_string(), |c| c.to_string()),
                if r.execution.status == "timeout" {
                    " (timed out)"
                } else {
                    ""
                }
            );
            text.push_str(&format!("\n--- stdout ---\n{}", r.stdout));
            if !r.stderr.is_empty() {
                text.push_str(&format!("\n--- stderr ---\n{}", r.stderr));
            }
            if r.truncated {
                text.push_str("\n(output cut; the API has the rest)\n");
            }
            let ok = r.execution.exit_code == Some(0);
            Answer {
                ok,
                text,
                slug: Some(env.slug.clone()),
            }
        }
        // Refused before it ran (the VM not running, say), or lost on the way: which one is
        // not always knowable, so the answer does not claim nothing ran.
        Err(AppError::InvalidState(e)) => Answer::failed(
            format!("Nothing was run in {}: {e}.\n", env.slug),
            Some(env),
        ),
        Err(e) => Answer::failed(
            format!(
                "The command may or may not have run in {}: {e}. Check before sending it again.\n",
                env.slug
            ),
            Some(env),
        ),
    })
}

fn describe(env: &Environment) -> String {
    let mut text = format!(
        "  Environment: {} ({})\n  State:       {}{}\n  Size:        {} vCPU, {} MB memory, {} GB disk\n",
        env.slug,
        env.name,
        env.state,
        env.state_message
            .as_deref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default(),
        env.vcpus,
        env.memory_mb,
        env.disk_gb
    );
    if let Some(at) = env.expires_at {
        text.push_str(&format!("  Expires:     {}\n", crate::events::time(at)));
    }
    if env.state == EnvState::Running {
        text.push_str(&connect_text(env));
    }
    text
}

fn connect_text(env: &Environment) -> String {
    match (&env.ssh_host, env.ssh_port) {
        (Some(host), Some(port)) if env.state == EnvState::Running => format!(
            "  SSH:         ssh -p {port} {}@{host}\n\nLog in with the key you gave at creation (sshPublicKey), or open a terminal in the web UI.\n",
            env.ssh_user
        ),
        _ => format!(
            "  SSH:         none while the environment is {}\n",
            env.state
        ),
    }
}

fn help_text(address: &str) -> String {
    format!(
        "Hearth takes commands by mail at {address}.\n\n\
The subject's first word is the command; in a reply, the first word of your first line.\n\n\
  create [2 vcpus] [4 gb ram] [20 gb disk] [8 hours]   make an environment\n\
  status env_xxxxxxxx                                   its state and size\n\
  connect env_xxxxxxxx                                  how to SSH in\n\
  execute env_xxxxxxxx  and a ``` fenced block ```      run the block, get its output\n\
  destroy env_xxxxxxxx                                  remove it and its VM\n\
  list                                                  your environments\n\
  help                                                  this text\n\n\
A body that is a JSON object is a command too: {{\"action\": \"create\", \"vcpus\": 2, \"duration\": \"8h\"}}.\n\
Only mail from your account's address is read, and only when it proves it is yours: send it to your\n\
secret address (make one in your account: POST /v1/me/mail-address) or from a domain that signs its mail with DKIM.\n"
    )
}

fn reply_subject(subject: &str, slug: Option<&str>) -> String {
    let subject = subject.trim();
    let base = if subject.is_empty() {
        "your message".to_string()
    } else {
        subject.to_string()
    };
    let base = if base.to_ascii_lowercase().starts_with("re:") {
        base
    } else {
        format!("Re: {base}")
    };
    match slug {
        Some(s) if !base.contains(s) => format!("{base} [{s}]"),
        _ => base,
    }
}

fn cut(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        return text.to_string();
    }
    let mut t: String = text.chars().take(chars).collect();
    t.push_str("\n(cut)\n");
    t
}

fn html_of(text: &str) -> String {
    let escaped = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;");
    format!(
        "<!doctype html><html><body><pre style=\"font-family:ui-monospace,Menlo,monospace;white-space:pre-wrap\">{escaped}</pre></body></html>"
    )
}

/// The relay's URL without its user and password, for messages.
fn relay_shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Sends the answer; an error says whether trying again could help (`true`: it cannot).
async fn send_reply(
    service: &MailService,
    mail: &Mail,
    reply_id: &str,
    text: &str,
) -> Result<(), (bool, String)> {
    let permanent = |m: String| (true, m);
    let from: Mailbox = service
        .config
        .address
        .parse()
        .map_err(|e| permanent(format!("the agent address cannot be used: {e}")))?;
    let to: Mailbox = mail
        .sender
        .parse()
        .map_err(|e| permanent(format!("the sender's address cannot be used: {e}")))?;
    let original = format!("<{}>", mail.message_id);
    let subject = mail
        .reply_subject
        .clone()
        .unwrap_or_else(|| reply_subject(&mail.subject, None));
    let message = lettre::Message::builder()
        .from(from)
        .to(to)
        .subject(subject)
        .message_id(Some(format!("<{reply_id}>")))
        .in_reply_to(original.clone())
        .references(original)
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("Auto-Submitted"),
            "auto-replied".into(),
        ))
        .multipart(MultiPart::alternative_plain_html(
            text.to_string(),
            html_of(text),
        ))
        .map_err(|e| permanent(format!("the reply cannot be built: {e}")))?;
    service.relay.send(message).await.map_err(|e| {
        (
            // A 5xx: the relay will never take it.
            e.is_permanent(),
            format!(
                "the relay {} did not take the reply: {e}",
                relay_shown(&service.config.relay)
            ),
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_lower_case_and_differ() {
        let a = new_mail_token();
        assert_eq!(a.len(), 26);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        );
        assert_ne!(a, new_mail_token());
        assert_eq!(token_hash(&a), token_hash(&a.to_uppercase()));
        assert_ne!(token_hash(&a), token_hash("x"));
    }

    #[test]
    fn reply_subjects_thread_and_name_the_environment() {
        assert_eq!(
            reply_subject("create", Some("env_ab12cd34")),
            "Re: create [env_ab12cd34]"
        );
        assert_eq!(
            reply_subject("Re: create [env_ab12cd34]", Some("env_ab12cd34")),
            "Re: create [env_ab12cd34]"
        );
        assert_eq!(reply_subject("", None), "Re: your message");
    }

    #[test]
    fn a_signature_proves_only_what_it_covers() {
        let all: Vec<String> = ["From", "To", "Subject", "Message-ID", "Date"]
            .map(String::from)
            .into();
        assert!(signature_counts("Example.com", &all, 0, "example.com"));
        assert!(
            !signature_counts("example.com", &all, 120, "example.com"),
            "l= lets text be added"
        );
        assert!(!signature_counts(
            "mail.example.com",
            &all,
            0,
            "example.com"
        ));
        let no_id: Vec<String> = ["from", "subject"].map(String::from).into();
        assert!(
            !signature_counts("example.com", &no_id, 0, "example.com"),
            "could be sent again under a new id"
        );
    }

    #[test]
    fn relay_credentials_are_never_shown() {
        assert_eq!(
            relay_shown("smtps://user:pa@ss@mail.example.com:465"),
            "smtps://…@mail.example.com:465"
        );
        assert_eq!(relay_shown("smtp://127.0.0.1:25"), "smtp://127.0.0.1:25");
    }

    #[test]
    fn html_is_escaped() {
        assert!(html_of("<script>&").contains("&lt;script&gt;&amp;"));
    }
}
