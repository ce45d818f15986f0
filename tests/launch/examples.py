"""The commands that produce launch/examples/ (also shown in launch/README.md)."""

def flan(bucket: str) -> list[str]:
  return ["--gin_file=gin/models/flan_switch_base.gin",
          "--gin_file=gin/runs/finetune.gin",
          f"--gin.INITIAL_CHECKPOINT_PATH='gs://{bucket}/switch_base_128/checkpoint_500000'",
          "--gin.TRAIN_STEPS=520000",
          "--gin.MESH_SHAPE={'data': -1, 'expert': 8, 'model': 1}"]


EXAMPLES = {
    "flan_moe_v4_64.sky.yaml": ("tpu", [
        "run", "--name", "flan-moe", "--tpu_type", "v4-64",
        "--zone", "us-central2-b", "--project", "my-project", "--spot",
        *flan("my-bucket"), "--model_dir", "gs://my-bucket/flan-moe",
        "--emit", "skypilot"]),
    "flan_moe_v5e_256.xpk.sh": ("tpu", [
        "run", "--name", "flan-moe", "--tpu_type", "v5e-256",
        "--zone", "us-west4-a", "--project", "my-project",
        *flan("my-bucket-us-west4"),
        "--model_dir", "gs://my-bucket-us-west4/flan-moe",
        "--emit", "xpk", "--cluster", "moe-v5e", "--restart_on_preemption"]),
    "flan_moe_2x8gpu.sbatch": ("gpu", [
        "--emit", "slurm", "--name", "flan-moe", "--nodes", "2",
        "--gpus_per_node", "8", *flan("my-bucket"),
        "--model_dir", "gs://my-bucket/flan-moe-gpu"]),
    "flan_moe_2x8gpu.sky.yaml": ("gpu", [
        "--emit", "skypilot", "--name", "flan-moe", "--nodes", "2",
        "--gpus_per_node", "8", "--gpu", "H100", "--spot", *flan("my-bucket"),
        "--model_dir", "gs://my-bucket/flan-moe-gpu"]),
}
