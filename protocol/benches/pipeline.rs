//! `cargo bench -p bdr-protocol`: throughput of the write pipeline's stages and of the
//! chained pipeline, in MB/s (1 MB = 10^6 bytes), plus the two ratios the design tracks:
//!
//! - pipeline efficiency: (sum of the stage times measured alone) / (chained time); 1.0
//!   means chaining costs nothing, the goal is >= 0.9;
//! - two-thread scaling: aggregate throughput of two threads each running the pipeline /
//!   one thread's; the goal is >= 1.8 on a 2-core machine.
//!
//! A custom harness rather than criterion: the ratios need the stage figures of the same
//! run side by side. `BDR_BENCH_ROUNDS` sets the timed rounds per figure (default 15);
//! each figure is the median round.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bdr_protocol::envelope::{self, KeyPurpose, RootKey};
use bdr_protocol::erasure::{CodecId, Shard, StripeCodec};
use bdr_protocol::ids::StripeId;

const SHARD_LENGTH_BYTES: usize = 1024 * 1024;

fn rounds() -> usize {
    std::env::var("BDR_BENCH_ROUNDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(15)
}

/// Median duration of `rounds` runs of `work`, after one warm-up run.
fn median_duration(mut work: impl FnMut()) -> Duration {
    work();
    let mut durations: Vec<Duration> = (0..rounds())
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed()
        })
        .collect();
    durations.sort();
    durations[durations.len() / 2]
}

fn megabytes_per_second(bytes: usize, duration: Duration) -> f64 {
    bytes as f64 / duration.as_secs_f64() / 1e6
}

fn report(name: &str, bytes: usize, duration: Duration) {
    println!("{name:<44} {:>9.1} MB/s", megabytes_per_second(bytes, duration));
}

fn test_data(length: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

struct Pipeline {
    naming_key: [u8; 32],
    data_key: envelope::DerivedKey,
    codec: StripeCodec,
}

impl Pipeline {
    fn new(codec: StripeCodec) -> Pipeline {
        let root = RootKey([7; 32]);
        Pipeline {
            naming_key: root.derive(KeyPurpose::StripeNaming, 0).bytes,
            data_key: root.derive(KeyPurpose::StripeData, 0),
            codec,
        }
    }

    fn hash(&self, plaintext: &[u8]) -> StripeId {
        StripeId::for_plaintext(&self.naming_key, plaintext)
    }

    fn seal(&self, stripe_id: &StripeId, plaintext: &[u8]) -> Vec<u8> {
        envelope::seal(&self.data_key, [1; 24], &envelope::stripe_binding(stripe_id), plaintext)
    }

    fn encode(&self, stripe_id: StripeId, sealed: &[u8]) -> Vec<Shard> {
        self.codec.encode(stripe_id, sealed).expect("encodes")
    }

    fn run(&self, plaintext: &[u8]) -> Vec<Shard> {
        let stripe_id = self.hash(plaintext);
        let sealed = self.seal(&stripe_id, plaintext);
        self.encode(stripe_id, &sealed)
    }
}

fn main() {
    // `cargo bench` passes "--bench"; `cargo test --all-targets` runs us without it, and
    // timing has no place in the test suite.
    if !std::env::args().any(|argument| argument == "--bench") {
        println!("pipeline benchmark: run it with `cargo bench -p bdr-protocol`");
        return;
    }
    println!(
        "bdr-protocol pipeline benchmark: {} rounds per figure, median round",
        rounds()
    );

    let four_mib = test_data(4 * SHARD_LENGTH_BYTES);
    let blake3_time = median_duration(|| {
        black_box(blake3::hash(black_box(&four_mib)));
    });
    report("blake3 (4 MiB)", four_mib.len(), blake3_time);
    let aead_key = RootKey([3; 32]).derive(KeyPurpose::StripeData, 0);
    let aead_time = median_duration(|| {
        black_box(envelope::seal(&aead_key, [2; 24], b"bench", black_box(&four_mib)));
    });
    report("xchacha20-poly1305 seal (4 MiB)", four_mib.len(), aead_time);
    let sealed = envelope::seal(&aead_key, [7; envelope::NONCE_LENGTH_BYTES], b"bench", &four_mib);
    let open_time = median_duration(|| {
        black_box(envelope::open(&aead_key, b"bench", black_box(&sealed)).unwrap());
    });
    report("xchacha20-poly1305 open (4 MiB)", four_mib.len(), open_time);

    let mut encode_figures = Vec::new();
    for (k, m) in [(4u8, 2u8), (8, 4)] {
        let stripe = test_data(usize::from(k) * SHARD_LENGTH_BYTES);
        for codec_id in CodecId::ALL {
            let codec = StripeCodec::new(codec_id, k, m).unwrap();
            let stripe_id = StripeId([k; 32]);
            let encode_time = median_duration(|| {
                black_box(codec.encode(stripe_id, black_box(&stripe)).unwrap());
            });
            report(
                &format!("{} encode {k}+{m} (1 MiB shards)", codec_id.name()),
                stripe.len(),
                encode_time,
            );
            // Worst case for reconstruction: the first m data shards are lost.
            let shards = codec.encode(stripe_id, &stripe).unwrap();
            let survivors: Vec<Shard> = shards[usize::from(m)..].to_vec();
            let decode_time = median_duration(|| {
                black_box(codec.decode(stripe_id, black_box(&survivors)).unwrap());
            });
            report(
                &format!("{} reconstruct {k}+{m} ({m} data lost)", codec_id.name()),
                stripe.len(),
                decode_time,
            );
            encode_figures.push((codec_id, k, m, encode_time));
        }
    }
    // A degraded read of a small object: a 64 KiB stripe, one data shard lost. Here the
    // codec's fixed cost per decode, not its speed per byte, decides.
    let small_stripe = test_data(64 * 1024);
    for codec_id in CodecId::ALL {
        let codec = StripeCodec::new(codec_id, 4, 2).unwrap();
        let stripe_id = StripeId([9; 32]);
        let survivors: Vec<Shard> = codec.encode(stripe_id, &small_stripe).unwrap()[1..].to_vec();
        let decode_time = median_duration(|| {
            black_box(codec.decode(stripe_id, black_box(&survivors)).unwrap());
        });
        println!(
            "{:<44} {:>9.1} µs per decode",
            format!("{} reconstruct 4+2 (64 KiB stripe)", codec_id.name()),
            decode_time.as_secs_f64() * 1e6
        );
    }
    for (k, m) in [(4u8, 2u8), (8, 4)] {
        let time_of = |codec: CodecId| {
            encode_figures
                .iter()
                .find(|f| f.0 == codec && f.1 == k && f.2 == m)
                .unwrap()
                .3
        };
        let ratio =
            time_of(CodecId::ReedSolomonErasure).as_secs_f64() / time_of(CodecId::ReedSolomonSimd).as_secs_f64();
        println!("encode {k}+{m}: reed-solomon-simd is {ratio:.2}x reed-solomon-erasure");
    }

    // The chained write pipeline at the gateway's defaults: 4 MiB stripes, 4+2.
    let pipeline = Pipeline::new(StripeCodec::new(CodecId::DEFAULT, 4, 2).unwrap());
    let stripe_id = pipeline.hash(&four_mib);
    let sealed = pipeline.seal(&stripe_id, &four_mib);
    let hash_time = median_duration(|| {
        black_box(pipeline.hash(black_box(&four_mib)));
    });
    let seal_time = median_duration(|| {
        black_box(pipeline.seal(&stripe_id, black_box(&four_mib)));
    });
    let encode_time = median_duration(|| {
        black_box(pipeline.encode(stripe_id, black_box(&sealed)));
    });
    let chained_time = median_duration(|| {
        black_box(pipeline.run(black_box(&four_mib)));
    });
    report("stage: keyed blake3 stripe id", four_mib.len(), hash_time);
    report("stage: seal", four_mib.len(), seal_time);
    report(
        &format!("stage: encode 4+2 ({})", CodecId::DEFAULT.name()),
        four_mib.len(),
        encode_time,
    );
    report(
        "pipeline hash -> seal -> encode, 1 thread",
        four_mib.len(),
        chained_time,
    );
    let serial_sum = hash_time + seal_time + encode_time;
    println!(
        "pipeline efficiency (serial sum of stages / chained): {:.2}",
        serial_sum.as_secs_f64() / chained_time.as_secs_f64()
    );

    // Two threads, each running the pipeline on its own stripes, timed together.
    let stripes_per_thread = 8;
    let one_thread = median_duration(|| {
        for _ in 0..stripes_per_thread {
            black_box(pipeline.run(black_box(&four_mib)));
        }
    });
    let two_threads = median_duration(|| {
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..stripes_per_thread {
                        black_box(pipeline.run(black_box(&four_mib)));
                    }
                });
            }
        });
    });
    let one_thread_rate = megabytes_per_second(stripes_per_thread * four_mib.len(), one_thread);
    let two_thread_rate = megabytes_per_second(2 * stripes_per_thread * four_mib.len(), two_threads);
    println!("pipeline, 2 threads aggregate                {two_thread_rate:>9.1} MB/s");
    println!(
        "two-thread scaling (2 threads / 1 thread): {:.2}",
        two_thread_rate / one_thread_rate
    );
}
