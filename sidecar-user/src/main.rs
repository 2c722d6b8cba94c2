//! `sidecar`: the binary. Parses the CLI, validates config before touching anything,
//! then builds (bind + attach), drops root, and runs.

mod cli;
mod cmd;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sidecar::{app, config::Config, ebpf::cgroup, process, telemetry};

use crate::cli::{Cli, Command, RunArgs};

/// Exit code for a bad configuration (EX_USAGE), distinct from runtime failures.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Check(args) => match Config::load(Some(&args.config), std::env::vars()) {
            Ok(config) => {
                println!("{}: valid", args.config.display());
                println!("inbound, what each port admits:");
                for line in sidecar::proxy::admission::InboundPolicy::describe(&config) {
                    println!("  {line}");
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("invalid configuration: {error}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Connections(args) => match connections(&args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Inject(args) => match inject(&args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("sidecar inject: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Discovery(args) => {
            let mut config = match Config::load(args.config.as_deref(), std::env::vars()) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("invalid configuration: {error}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            if let Some(path) = args.kubeconfig {
                config.kubernetes.kubeconfig = Some(path);
            }
            if !args.namespaces.is_empty() {
                config.kubernetes.namespaces = args.namespaces;
            }
            match cmd::discovery::run(config, args.trust_domain, args.json) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("sidecar discovery: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Certs(args) => match certs(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("{error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            let config = match Config::load(args.config.as_deref(), std::env::vars()) {
                Ok(config) => config,
                Err(error) => {
                    tracing::error!("invalid configuration: {error}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match run(config, &args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn certs(args: &cli::CertsArgs) -> anyhow::Result<()> {
    use sidecar::tls::{SpiffeId, dev_ca};
    let ca = match &args.ca {
        Some(dir) => {
            let read = |name: &str| {
                let path = dir.join(name);
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))
            };
            dev_ca::DevCa::load(&read("ca.pem")?, &read("ca-key.pem")?)?
        }
        None => dev_ca::DevCa::new(&args.trust_domain)?,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    dev_ca::write(&args.out.join("ca.pem"), &ca.ca_pem(), false)?;
    dev_ca::write(&args.out.join("ca-key.pem"), &ca.ca_key_pem(), true)?;
    let validity = dev_ca::Validity {
        lifetime: match args.seconds {
            Some(seconds) => time::Duration::seconds(seconds),
            None => time::Duration::hours(args.hours),
        },
        ..Default::default()
    };
    for spec in &args.workloads {
        let (name, rest) = spec.split_once('=').with_context(|| {
            format!("--workload {spec:?}: expected NAME=NAMESPACE/SERVICE_ACCOUNT")
        })?;
        let (namespace, account) = rest.split_once('/').with_context(|| {
            format!("--workload {spec:?}: expected NAME=NAMESPACE/SERVICE_ACCOUNT")
        })?;
        let id = SpiffeId::workload(&args.trust_domain, namespace, account)
            .with_context(|| format!("--workload {spec:?}"))?;
        let dir = args.out.join(name);
        ca.write_workload(&dir, &id, args.key_type, validity)?;
        println!("{name}: {id} -> {}", dir.display());
    }
    Ok(())
}

fn inject(args: &cli::InjectArgs) -> anyhow::Result<String> {
    use std::io::Read;
    let input = match &args.file {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            text
        }
    };
    let options = cmd::inject::InjectOptions {
        image: args.image.clone(),
        config_map: args.config_map.clone(),
        identity_secret: (!args.no_identity).then(|| args.identity_secret.clone()),
        keep_app_token: args.keep_app_token,
    };
    Ok(cmd::inject::inject(&input, &options)?)
}

fn connections(args: &cli::ConnectionsArgs) -> anyhow::Result<String> {
    let body = cmd::admin_client::get(args.admin, "/connections")?;
    if args.json {
        return Ok(body);
    }
    let views: Vec<sidecar::proxy::connections::ConnView> =
        serde_json::from_str(&body).context("parsing /connections")?;
    Ok(cmd::connections::render_table(&views))
}

fn run(config: Config, args: &RunArgs) -> anyhow::Result<()> {
    // Name a missing capability now rather than as an EPERM from bpf(2) later.
    sidecar::caps::check_required(args.netns.is_some())?;
    let app_probes = sidecar::app_health::from_env().map_err(anyhow::Error::msg)?;
    if let Some(netns) = &args.netns {
        process::enter_netns(netns)?;
    }
    let cgroup = cgroup::resolve(&cgroup::CgroupSelector {
        dir: args.cgroup.clone(),
        pod_uid: args.pod_uid.clone(),
        root: args.cgroup_root.clone(),
    })?;
    let nofile = process::raise_nofile_limit();
    tracing::debug!(nofile, "open file limit");
    let uid = config.proxy.uid;
    let mut bound = app::build(config, &cgroup)
        .context("starting the sidecar")?
        .with_app_probes(app_probes);
    if let Some(path) = &args.config {
        // Services, endpoints and the outbound policy reload when the file changes.
        bound = bound.watch_config(sidecar::service::discovery::ConfigSource {
            path: path.clone(),
            env: std::env::vars()
                .filter(|(k, _)| k.starts_with(sidecar::config::ENV_PREFIX))
                .collect(),
        });
    }
    process::become_proxy_user(uid)?;
    // Test hook: hold between attaching the programs and serving, to show that app
    // connects made in that window wait for the proxy instead of going around it.
    if let Ok(hold) = std::env::var("SIDECAR_TEST_HOLD_AFTER_ATTACH") {
        let hold = humantime::parse_duration(&hold)
            .with_context(|| format!("SIDECAR_TEST_HOLD_AFTER_ATTACH={hold:?}"))?;
        tracing::warn!(?hold, "test hook: holding after attach before serving");
        std::thread::sleep(hold);
    }
    bound.run().context("running the proxy")
}
