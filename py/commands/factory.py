"""``diffusion-matting factory``: make a matting dataset by driving running ComfyUI servers over their API."""

from __future__ import annotations

from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser(
        "factory", help="generate a matting dataset with ComfyUI servers (prompts x seeds -> image/alpha/fg)",
        description="Queue a workflow that ends in Save Matting Sample on one or more running ComfyUI servers, "
                    "once per job (prompt = line job %% lines of --prompts, seed = --seed + job), and collect "
                    "the samples into OUT/{image,alpha,fg,captions}/ + OUT/manifest.jsonl (the node's layout). "
                    "Run it again with the same arguments to resume: finished jobs are skipped, jobs an "
                    "interrupted run left queued or finished on a server are collected, not re-queued. "
                    "The prompt goes into the node titled 'prompt' (its text/value widget; else the "
                    "CLIPTextEncode feeding a sampler's positive input), the seed into the node titled 'seed' "
                    "and every seed/noise_seed widget.")
    p.add_argument("--server", action="append", required=True, metavar="URL",
                   help="ComfyUI server, e.g. http://127.0.0.1:8188 (repeat to spread jobs over several)")
    p.add_argument("--workflow", required=True, metavar="JSON",
                   help="workflow file (UI format as the front end saves it, or API format)")
    p.add_argument("--prompts", required=True, metavar="TXT", help="prompts, one per line ('#' = comment)")
    p.add_argument("--count", required=True, type=int, metavar="N", help="number of jobs (queued generations)")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder (created; resumable)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed of job 0 (job j uses S + j); default: random, kept in DIR/factory.json")
    p.add_argument("--prefix", default="sample", help="sample names: <prefix>_<job> (default sample)")
    p.add_argument("--prompt-title", default="prompt", metavar="TITLE",
                   help="title of the node that takes the prompt text (default 'prompt')")
    p.add_argument("--seed-title", default="seed", metavar="TITLE",
                   help="title of a node whose value is the seed (default 'seed')")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="SEC", help="per-job time limit (3600)")
    p.add_argument("--poll", type=float, default=1.0, metavar="SEC",
                   help="how often to ask /history when events are quiet (1.0)")
    p.add_argument("--no-websocket", action="store_true", help="poll /history instead of listening on /ws")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="queue a job that fails on a server (execution error, interruption, bad download) again, "
                        "on any server, up to N times (2); a prompt the server rejects or a timeout stops the run")
    p.add_argument("--keep-going", action="store_true",
                   help="set aside a job that fails every try and go on with the others; the run then ends with "
                        "an error listing them (run the same command again to try just those)")
    p.set_defaults(func=run)


def run(args) -> int:
    import hashlib
    from pathlib import Path

    from ..factory import Factory, load_prompts, load_workflow

    if args.count < 0:
        raise UserError("--count must be >= 0")
    if args.seed is not None and args.seed < 0:
        raise UserError("--seed must be >= 0")
    workflow = load_workflow(args.workflow)
    prompts = load_prompts(args.prompts)
    factory = Factory(args.server, workflow, prompts, args.count, args.out, seed=args.seed, prefix=args.prefix,
                      prompt_title=args.prompt_title, seed_title=args.seed_title, job_timeout=args.timeout,
                      poll_interval=args.poll, use_websocket=not args.no_websocket,
                      workflow_id=hashlib.sha256(Path(args.workflow).read_bytes()).hexdigest(),
                      retries=args.retries, keep_going=args.keep_going)
    try:
        results = factory.run()
    except TimeoutError as exc:
        raise UserError(str(exc)) from None
    total = len(factory.done_jobs())
    print(f"{len(results)} job(s) done now, {total}/{args.count} in {args.out} "
          f"({sum(len(r.names) for r in results)} new sample(s))")
    return 0
