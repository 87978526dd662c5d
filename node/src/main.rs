//! `bdr-node`: parses the command line and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bdr_node::config::NodeConfig;
use bdr_node::identity::NodeIdentity;
use bdr_node::runtime::{self, admin};
use bdr_protocol::admission::ClusterSecret;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "bdr-node",
    version,
    about = "bdr storage node: backup and disaster-recovery cluster"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create this node's identity in DIR (kept if it exists) and print its node id.
    Init {
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
    },
    /// Print a new random cluster secret (put it in every node's cluster_secret_file).
    GenSecret,
    /// Start a whole local cluster in this process (S3 and admin API on loopback).
    Dev {
        /// Folder for all data, keys and credentials; reused on restart.
        #[arg(long, value_name = "DIR", default_value = "./bdr-dev")]
        data: PathBuf,
        #[arg(long, default_value_t = 6)]
        nodes: u32,
        #[arg(long, default_value_t = 3)]
        zones: u32,
        #[arg(long, default_value = "127.0.0.1:9000")]
        s3_listen: std::net::SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9001")]
        admin_listen: std::net::SocketAddr,
    },
    /// Run one node.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Talk to a node's admin API.
    Admin {
        /// Base URL of the admin API.
        #[arg(long, env = "BDR_ADMIN_ENDPOINT", default_value = "http://127.0.0.1:9001")]
        endpoint: String,
        /// File holding the admin token.
        #[arg(long, env = "BDR_ADMIN_TOKEN_FILE", value_name = "FILE")]
        token_file: PathBuf,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Cluster membership as this node sees it.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// S3 access keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Who may use a bucket besides its owner.
    Bucket {
        #[command(subcommand)]
        command: BucketCommand,
    },
    /// Rebuilding lost shards and moving shards after layout changes.
    Repair {
        #[command(subcommand)]
        command: RepairCommand,
    },
    /// Re-reading and verifying every shard.
    Scrub {
        #[command(subcommand)]
        command: ScrubCommand,
    },
    /// Draining and removing nodes.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// The cluster layout.
    Layout {
        #[command(subcommand)]
        command: LayoutCommand,
    },
}

#[derive(Subcommand)]
enum RepairCommand {
    /// Resume repair everywhere and start a pass now.
    Start {
        #[arg(long)]
        json: bool,
    },
    /// Pause repair everywhere (surveys, scrub and garbage collection go on).
    Pause {
        #[arg(long)]
        json: bool,
    },
    /// Stripes by health and repair progress.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ScrubCommand {
    /// Start a scrub pass on every node now.
    Start {
        #[arg(long)]
        json: bool,
    },
    /// Scrub progress.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Move every shard off a node (it receives no new ones).
    Drain {
        /// Node id, or its first 8 or more hex characters.
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a node for good. Refused unless it is drained or down and every stripe is
    /// at full redundancy without it.
    Remove {
        id: String,
        /// Remove even if that leaves stripes short of full redundancy.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum LayoutCommand {
    /// Every node in the layout with its zone, capacity, roles and status.
    Show {
        #[arg(long)]
        json: bool,
    },
}

/// Prints `value` as JSON, or `human` of it.
fn print_either<T: serde::Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    match json {
        true => println!("{}", serde_json::to_string_pretty(value)?),
        false => print!("{}", human(value)),
    }
    Ok(())
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create an access key; prints its id and secret.
    Create {
        name: String,
        /// Allow this key to create buckets.
        #[arg(long)]
        allow_create_bucket: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BucketCommand {
    /// Give an access key rights on a bucket, replacing what it had (no --read and no
    /// --write takes every right away).
    Allow {
        bucket: String,
        /// The access key id to grant.
        #[arg(long = "key")]
        key_id: String,
        /// List and read objects.
        #[arg(long)]
        read: bool,
        /// Write, overwrite and delete objects.
        #[arg(long)]
        write: bool,
        #[arg(long)]
        json: bool,
    },
    /// Take every right on a bucket away from an access key.
    Deny {
        bucket: String,
        #[arg(long = "key")]
        key_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Show a bucket's owner and granted keys.
    Grants {
        bucket: String,
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p=warn,sled=warn,yamux=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    Ok(())
}

async fn run_dev(options: bdr_node::runtime::dev::DevOptions) -> anyhow::Result<()> {
    use bdr_node::env::Env;
    let cluster = bdr_node::runtime::dev::start_dev(&options).await?;
    println!(
        "bdr dev cluster: {} nodes in {} zones, data in {}",
        options.nodes,
        options.zones,
        options.data_dir.display()
    );
    println!("S3 endpoint:       {}", cluster.s3_endpoint);
    println!("region:            {}", cluster.region);
    println!("access key id:     {}", cluster.access_key_id);
    println!("secret access key: {}", cluster.secret_access_key);
    println!("admin endpoint:    {}", cluster.admin_endpoint);
    println!("admin token:       {}", cluster.admin_token);
    println!("credentials:       source {}", cluster.credentials_file.display());
    println!("ready (Ctrl-C stops)");
    wait_for_shutdown().await?;
    for node in &cluster.nodes {
        node.env().meta_store().flush().await?;
    }
    Ok(())
}

async fn run_node(config_path: PathBuf) -> anyhow::Result<()> {
    let config = NodeConfig::load(&config_path)?;
    let node = runtime::start_node(&config).await?;
    wait_for_shutdown().await?;
    use bdr_node::env::Env;
    node.cluster.env().meta_store().flush().await?;
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { data } => {
            let (identity, created) = NodeIdentity::load_or_create(&data)?;
            println!("{}", identity.node_id);
            eprintln!(
                "{} identity in {}; peer id for /p2p/ addresses: {}",
                if created { "created" } else { "kept existing" },
                data.display(),
                identity.peer_id
            );
        }
        Command::GenSecret => println!("{}", ClusterSecret::from_bytes(rand::random()).to_hex()),
        Command::Dev {
            data,
            nodes,
            zones,
            s3_listen,
            admin_listen,
        } => {
            init_logging(cli.log_format);
            bdr_node::runtime::tune_allocator_for_large_buffers();
            let options = bdr_node::runtime::dev::DevOptions {
                data_dir: data,
                nodes,
                zones,
                s3_listen,
                admin_listen,
            };
            tokio::runtime::Runtime::new()
                .context("cannot start the async runtime")?
                .block_on(run_dev(options))?;
        }
        Command::Run { config } => {
            init_logging(cli.log_format);
            bdr_node::runtime::tune_allocator_for_large_buffers();
            tokio::runtime::Runtime::new()
                .context("cannot start the async runtime")?
                .block_on(run_node(config))?;
        }
        Command::Admin {
            endpoint,
            token_file,
            command,
        } => {
            let token = admin::read_token(&token_file).map_err(anyhow::Error::msg)?;
            match command {
                AdminCommand::Key {
                    command:
                        KeyCommand::Create {
                            name,
                            allow_create_bucket,
                            json,
                        },
                } => {
                    let key = admin::create_key(&endpoint, &token, &name, allow_create_bucket)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&key)?);
                    } else {
                        println!("access key id:     {}", key.key_id);
                        println!("secret access key: {}", key.secret_key);
                    }
                }
                AdminCommand::Bucket { command } => {
                    let (view, json) = match command {
                        BucketCommand::Allow {
                            bucket,
                            key_id,
                            read,
                            write,
                            json,
                        } => {
                            let grant = admin::GrantView { key_id, read, write };
                            (admin::grant_bucket_remote(&endpoint, &token, &bucket, &grant)?, json)
                        }
                        BucketCommand::Deny { bucket, key_id, json } => {
                            let grant = admin::GrantView {
                                key_id,
                                read: false,
                                write: false,
                            };
                            (admin::grant_bucket_remote(&endpoint, &token, &bucket, &grant)?, json)
                        }
                        BucketCommand::Grants { bucket, json } => {
                            (admin::fetch_bucket_grants(&endpoint, &token, &bucket)?, json)
                        }
                    };
                    print_either(json, &view, admin::format_bucket_grants)?;
                }
                AdminCommand::Status { json } => {
                    let status = admin::fetch_status(&endpoint, &token)?;
                    print_either(json, &status, admin::format_status_table)?;
                }
                AdminCommand::Repair { command } => {
                    let (view, json) = match command {
                        RepairCommand::Start { json } => (
                            admin::control_maintenance_remote(&endpoint, &token, "repair-start")?,
                            json,
                        ),
                        RepairCommand::Pause { json } => (
                            admin::control_maintenance_remote(&endpoint, &token, "repair-pause")?,
                            json,
                        ),
                        RepairCommand::Status { json } => (admin::fetch_maintenance(&endpoint, &token)?, json),
                    };
                    print_either(json, &view, |view| admin::format_maintenance_summary(&view.summary))?;
                }
                AdminCommand::Scrub { command } => {
                    let (view, json) = match command {
                        ScrubCommand::Start { json } => (
                            admin::control_maintenance_remote(&endpoint, &token, "scrub-start")?,
                            json,
                        ),
                        ScrubCommand::Status { json } => (admin::fetch_maintenance(&endpoint, &token)?, json),
                    };
                    print_either(json, &view, |view| admin::format_maintenance_summary(&view.summary))?;
                }
                AdminCommand::Node { command } => {
                    let (answer, json) = match command {
                        NodeCommand::Drain { id, json } => {
                            (admin::node_action_remote(&endpoint, &token, &id, "drain", false)?, json)
                        }
                        NodeCommand::Remove { id, force, json } => (
                            admin::node_action_remote(&endpoint, &token, &id, "remove", force)?,
                            json,
                        ),
                    };
                    print_either(json, &answer, |answer| {
                        format!(
                            "node {}: {} done\n",
                            answer["node"].as_str().unwrap_or("?"),
                            answer["action"].as_str().unwrap_or("?")
                        )
                    })?;
                }
                AdminCommand::Layout {
                    command: LayoutCommand::Show { json },
                } => {
                    let layout = admin::fetch_layout(&endpoint, &token)?;
                    print_either(json, &layout, admin::format_layout)?;
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bdr-node: {error:#}");
            ExitCode::FAILURE
        }
    }
}
