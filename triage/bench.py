"""``bench_triage()`` — latency, throughput and memory of the shipped triage (issue targets: one ~130-character
message ≤ 30 ms p50 and ≤ 60 ms p95 after warm-up; ≥ 100 messages/s in batches; < 1.5 GB RSS).

Every timed message is new to the process (a numbered prefix), so the encoder's LRU cache never answers.
"""

from __future__ import annotations

import resource
import statistics
import time

TEMPLATES = [  # about 130 characters each, the median length of the real messages
    "幸福路和建设路交叉口往东那一段的路灯已经坏了快两个星期了，晚上黑漆漆的一片，附近小区的老人晚上出门散步根本看不清路，前两天还有人骑电动车摔倒了，希望有关部门尽快派人来修一下，谢谢。这条路是附近学生上下学的必经之路，家长们都很担心孩子的安全，麻烦尽快安排人来看看。",
    "我是外地来这边打工的，在城南租房住了半年多了，想问一下在县城办理居住证需要准备哪些材料，租房合同可以当证明吗？要不要单位开在职证明？去哪个窗口办，周末能不能办，大概多久能拿到？另外想了解一下居住证办好以后，孩子在这边上学、看病报销能享受哪些和本地人一样的待遇？",
    "小区门口那家烧烤摊每天晚上把桌子摆到人行道上，一直营业到凌晨两三点，油烟和划拳的噪音特别大，家里老人孩子都睡不好觉，已经向物业和社区反映过好几次了，一直没人管，请相关部门来处理一下。我们也不想把事情闹大，只希望能正常休息，麻烦执法人员晚上来现场看一看，依法处理一下。",
    "我们村的自来水从前天早上开始就停了，到现在已经两天了，全村一百多户人家都没水用，做饭洗衣服都成问题，事先也没有任何通知，打供水公司电话一直占线，请问什么时候能恢复供水？家里还有卧床的老人需要用水，现在只能去邻村一桶一桶地拉，希望尽快派人抢修并说明原因。",
    "建议在人民公园南门增设一个公交站台，现在离公园最近的站要走二十多分钟，老年人每天早上去公园锻炼很不方便，夏天太阳又大，周边几个小区的居民都有这个想法，希望有关部门考虑采纳。如果暂时不能设站，能不能考虑把现有线路稍微调整一下，或者在早上增开几趟班车，谢谢。",
    "举报城东农贸市场旁边那家饭店，后厨卫生条件非常差，我在那里打过几天零工，亲眼看到他们用过期变质的冻肉做菜，还有没有健康证的人在切菜，餐具也不消毒，请市场监管部门尽快去查一查。我可以提供拍到的照片和当时的时间，希望查处以后能把结果告诉我，保护一下举报人的信息。",
    "公司拖欠我们车间十几个工人三个月的工资了，加起来有十多万，老板一直说等下个月回款就发，现在电话也不接了，厂门也锁了，我们都是外地来打工的，家里等着钱用，请问该找哪个部门，能不能帮我们讨薪？之前也去劳动监察大队问过一次，说要先准备材料，但我们不清楚具体要哪些证据，怎么申请仲裁。",
    "医保异地就医备案怎么办理？我的医保是在老家县里交的，现在在成都帮女儿带孩子，平时有高血压要长期拿药，看病能不能直接结算，需要在手机上办还是要回老家去办，备案以后多久生效？老家那边的经办人员说可以在国家医保服务平台上办，但我试了几次都没成功，想问问具体步骤。",
]


def bench_messages(n: int, tag: str = "") -> list[str]:
    return [f"{tag}{i}号：" + TEMPLATES[i % len(TEMPLATES)] for i in range(n)]


def bench_triage(n: int = 200, batch_size: int = 256, triager=None) -> dict:
    """Single-message latency (p50/p95 after warm-up), batch throughput and peak RSS of ``Triager``."""
    t_load = time.perf_counter()
    if triager is None:
        from triage.pipeline import Triager

        triager = Triager.load()
    load_s = time.perf_counter() - t_load
    triager.triage_many(bench_messages(16, "预热"))  # warm-up: model, jieba, torch kernels
    for text in bench_messages(8, "单条预热"):
        triager.triage(text)
    latencies = []
    for text in bench_messages(n, "单条"):
        t0 = time.perf_counter()
        triager.triage(text)
        latencies.append((time.perf_counter() - t0) * 1000)
    latencies.sort()
    batch = bench_messages(batch_size, "批量")
    t0 = time.perf_counter()
    triager.triage_many(batch)
    rate = len(batch) / (time.perf_counter() - t0)
    return {
        "messages": n,
        "mean_chars": round(statistics.mean(len(t) for t in bench_messages(len(TEMPLATES))), 1),
        "p50_ms": round(latencies[len(latencies) // 2], 1),
        "p95_ms": round(latencies[max(int(len(latencies) * 0.95) - 1, 0)], 1),
        "max_ms": round(latencies[-1], 1),
        "batch_msgs_per_s": round(rate, 1),
        "batch_size": batch_size,
        "load_s": round(load_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(bench_triage(), ensure_ascii=False, indent=2))
